"""heartseg.runtime: the torch-free inference side and the contract every part shares."""

__version__ = "0.1.0"
