"""The `duet` subcommands of the runtime, each module registering its own through the
`duet.commands` entry-point group; `options` holds what every subcommand shares."""
