"""omni: unified models that read and write interleaved text and continuous-token images."""

__version__ = "0.1.0"
