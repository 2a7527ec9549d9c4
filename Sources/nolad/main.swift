import ArgumentParser
import Daemon
import NoladCLI
import Foundation

// First, before any code compiled for x86-64-v3 can run: a CPU without AVX2/FMA gets a sentence, not SIGILL.
// (This target, Daemon and CImageSupport are compiled without -march=x86-64-v3; Swift globals in the
// numeric modules are initialised lazily, on first use, so nothing of theirs has run yet.)
if let refusal = CPUCheck.startupRefusal() {
    FileHandle.standardError.write(Data("nolad: \(refusal)\n".utf8))
    exit(78)  // EX_CONFIG: the units do not restart on it (RestartPreventExitStatus=78)
}

/// Runs the async entry point of AsyncParsableCommand (in top-level code plain `main()` resolves to the
/// synchronous one of ParsableCommand, which refuses async roots).
func runAsync<Command: AsyncParsableCommand>(_ command: Command.Type) async {
    await command.main(nil)
}

await runAsync(NoladCommand.self)
