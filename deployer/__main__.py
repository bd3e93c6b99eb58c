"""``python -m deployer`` is ``gguf-deploy``."""

from deployer.cli import main

if __name__ == "__main__":
    main(prog_name="gguf-deploy")
