"""timm: not converted yet."""
LIBRARY = "timm"


def converters():
    return {}
