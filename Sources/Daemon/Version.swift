/// The version the daemon reports in `nola.workers` and `--version` (scripts/package reads this line).
public let noladVersion = "0.1.0"
