import Daemon

await NoladCommand.main()
