from saikyo.cli import main

main()
