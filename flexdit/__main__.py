from flexdit.cli import main

main()
