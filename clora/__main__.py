from clora.cli import main

main()
