"""`python -m demo` (`make demo`): see the package docstring."""

from demo import main

main()
