"""Ray-orchestrated worker groups and the controller that drives them."""
