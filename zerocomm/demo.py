"""`python -m zerocomm.demo` / `torchrun ... -m zerocomm.demo`: the demo,
which lives in zerocomm.testing.demo (outside the library's core)."""

from .testing.demo import main

if __name__ == "__main__":
    main()
