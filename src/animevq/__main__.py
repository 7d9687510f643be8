"""``python -m animevq …``: the same as the ``animevq`` console script."""

from animevq.command import main

main()
