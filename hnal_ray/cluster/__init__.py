"""Everything that touches Ray lives in this subpackage (actors, sessions, Data, Train)."""
