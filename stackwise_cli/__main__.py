from stackwise_cli.app import main

main()
