"""omnifuse: OmniFuse multimodal learning on low-quality medical data, from the command line."""

__version__ = "0.1.0"
