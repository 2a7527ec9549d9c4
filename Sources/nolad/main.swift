import ArgumentParser
import Daemon

/// Runs the async entry point of AsyncParsableCommand (in top-level code plain `main()` resolves to the
/// synchronous one of ParsableCommand, which refuses async roots).
func runAsync<Command: AsyncParsableCommand>(_ command: Command.Type) async {
    await command.main(nil)
}

await runAsync(NoladCommand.self)
