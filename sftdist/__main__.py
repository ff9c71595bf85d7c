"""`python -m sftdist ...`: the module path `accelerate launch -m sftdist train RECIPE` runs on every rank."""

from sftdist.cli import main

main()
