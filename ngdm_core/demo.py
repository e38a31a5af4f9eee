"""``python -m ngdm_core.demo``: the shapes demo under its short name (see :mod:`ngdm_core.shapes.demo`)."""

from .shapes.demo import main

if __name__ == "__main__":
    main()
