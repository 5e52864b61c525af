"""heartseg.train."""
