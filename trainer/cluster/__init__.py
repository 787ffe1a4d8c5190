"""Worker groups and the controller that drives them: Ray actors, or a group of one in the driver's process."""
