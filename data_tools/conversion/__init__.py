"""The converter's pieces (`data_tools.convert` is the command): `discovery` finds the
studies, `reading` reads and encodes one, `shards` runs a study's job and writes the shards,
`pipeline` plans and drives the whole conversion."""
