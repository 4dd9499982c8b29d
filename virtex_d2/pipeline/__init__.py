"""The project's stages as one pipeline: the built-in demo and the stage runner."""
