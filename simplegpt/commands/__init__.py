"""One module per `simplegpt` subcommand: HELP, add_arguments(parser), run(args)."""
