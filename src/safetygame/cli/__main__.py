from safetygame.cli import main

main()
