"""rnnserve: a gRPC model server for Keras recurrent classifiers."""

__version__ = "0.1.0"
