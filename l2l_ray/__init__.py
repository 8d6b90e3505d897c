"""l2l-ray: Learning to Label for semi-supervised referring expression segmentation, on Ray."""

__version__ = "0.1.0"
