import ArgumentParser
import Daemon

/// The root of the `nolad` command line; each subcommand lives in its own file.
@available(macOS 10.15, *)
public struct NoladCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "nolad",
        abstract: "Label unlabeled image collections with the NoLA method (CLIP + DINO, no human labels).",
        version: noladVersion,
        subcommands: [ServeCommand.self, MigrateCommand.self, SubmitCommand.self, StatusCommand.self,
                      CancelCommand.self, RequeueCommand.self, LabelsCommand.self, ExportCommand.self, EvaluateCommand.self, ImageBenchCommand.self,
                      EmbedImage.self, EmbedText.self, Bench.self, BenchJob.self, BenchScale.self, TokenizeCommand.self]
    )

    public init() {}
}
