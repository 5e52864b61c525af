"""heartseg.models."""
