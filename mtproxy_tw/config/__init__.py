"""
The configuration model: every option once, with its default, help text
and check (:mod:`.schema`); the TOML file that holds the same keys
(:mod:`.tomlfile`); and the option reference the docs are generated from
(:mod:`.reference`).
"""
