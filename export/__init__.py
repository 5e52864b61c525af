"""heartseg.export."""
