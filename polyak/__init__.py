"""The foundation every folder shares: the recipe schema, the error type, and the formats of a run's directory."""
