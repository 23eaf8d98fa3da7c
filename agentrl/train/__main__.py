"""``accelerate launch -m agentrl.train --config RECIPE [--section.key=value ...]``."""

from agentrl.train.cli import main

main()
