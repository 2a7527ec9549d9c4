import ArgumentParser
import Daemon
import Foundation
import Models

/// `nolad tokenize --model DIR TEXT...`: CLIP token ids, one JSON object per text on stdout,
/// `{"text": ..., "ids": [...]}` with BOS and EOS, truncated to the context length, no padding.
struct TokenizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenize",
        abstract: "Print the CLIP token ids of each text as JSON Lines (BOS and EOS included, no padding)."
    )

    @Option(name: .long, help: "Model folder with vocab.json and merges.txt (Hugging Face layout).")
    var model: String

    @Option(name: .long, help: "At most this many ids per text, EOS kept (CLIP's text context is 77).")
    var contextLength: Int = 77

    @Argument(help: "Texts to tokenize.")
    var texts: [String]

    func validate() throws {
        guard contextLength >= 2 else { throw ValidationError("--context-length must be at least 2 (BOS and EOS)") }
        guard !texts.isEmpty else { throw ValidationError("give at least one text") }
    }

    func run() throws {
        let tokenizer: CLIPTokenizer
        do {
            tokenizer = try CLIPTokenizer(folder: URL(fileURLWithPath: model))
        } catch {
            FileHandle.standardError.write(Data("nolad tokenize: \(error)\n".utf8))
            throw ExitCode.failure
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        var output = Data()
        for text in texts {
            let ids = tokenizer.encode(text, contextLength: contextLength)
            output.append(contentsOf: Array("{\"text\":".utf8))
            output.append(try encoder.encode(text))
            output.append(contentsOf: Array(",\"ids\":[\(ids.map(String.init).joined(separator: ","))]}\n".utf8))
        }
        FileHandle.standardOutput.write(output)
    }
}
