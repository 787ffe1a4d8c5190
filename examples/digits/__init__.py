"""Classification of scikit-learn's bundled handwritten digits (``task``)."""
