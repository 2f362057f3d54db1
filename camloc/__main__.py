from camloc.cli.app import main

main()
