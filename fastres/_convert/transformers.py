"""transformers: not converted yet."""
LIBRARY = "transformers"


def converters():
    return {}
