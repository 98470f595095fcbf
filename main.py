"""LightningCLI entry point: python main.py fit --config configs/grpo.yaml"""

from unirl_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
