"""Stand-in for edm2's ``torch_utils.persistence`` (tests only): classes are pickled by reference."""


def persistent_class(cls):
    return cls
