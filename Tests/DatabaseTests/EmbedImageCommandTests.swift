import Foundation
import XCTest

/// `nolad embed-image` on real JPEGs with the bundled demo models (Demo/models), against transformers
/// on Pillow's decoded image: the standard view through AutoImageProcessor (the folders' preprocessor_config.json),
/// the clip and dino views through torchvision (reference/make_cli_fixtures.py).
final class EmbedImageCommandTests: XCTestCase {
    struct Case: Decodable { let model: String; let file: String; let view: String; let embedding: [Float] }
    struct Fixture: Decodable { let cases: [Case] }

    let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func testEmbedImage_onDemoJPEGs_matchesTransformers() throws {
        let data = try Data(contentsOf: pipelineFixtures.appendingPathComponent("embed_image.json"))
        let fixture = try JSONDecoder().decode(Fixture.self, from: data)
        XCTAssertEqual(fixture.cases.count, 8)
        for c in fixture.cases {
            let (status, output) = try runProgram(try noladExecutable(), [
                "embed-image", "--threads", "1", "--view", c.view,
                "--model", repository.appendingPathComponent(c.model).path,
                repository.appendingPathComponent(c.file).path,
            ])
            XCTAssertEqual(status, 0, output)
            let line = try XCTUnwrap(output.split(separator: "\n").first { $0.hasPrefix("{") }, output)
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            let embedding = try XCTUnwrap(object["embedding"] as? [Double]).map(Float.init)
            XCTAssertEqual(embedding.count, c.embedding.count)
            let scale = c.embedding.map(abs).max() ?? 1
            let maxError = zip(embedding, c.embedding).map { abs($0 - $1) }.max() ?? .infinity
            print("embed-image \(c.model) \(c.file) view \(c.view): max abs error \(maxError) (output scale \(scale), tolerance \(1e-4 * scale))")
            XCTAssertLessThanOrEqual(maxError, 1e-4 * scale, "\(c.model) \(c.file) \(c.view)")
        }
    }

    /// A hub-layout DINOv2 folder (config.json image_size 518, preprocessor_config.json shorter side 256, crop
    /// 224): the standard view follows the processor, as AutoImageProcessor + Dinov2Model
    /// (reference/make_preprocessor_fixtures.py); `--view dino` still uses config.json's image_size.
    func testEmbedImage_onDINOv2FolderWithPreprocessorConfig_matchesAutoImageProcessor() throws {
        struct Cases: Decodable { let cases: [Case] }
        struct Case: Decodable { let name: String; let model: String; let file: String; let embedding: [Float] }
        let fixtures = repository.appendingPathComponent("Tests/MethodTests/Fixtures/preprocessor")
        let cases = try JSONDecoder().decode(Cases.self, from: Data(contentsOf: fixtures.appendingPathComponent("cases.json"))).cases
            .filter { $0.name == "dinov2_hub" }
        XCTAssertEqual(cases.count, 4)
        let model = fixtures.appendingPathComponent("dinov2-518").path
        let (status, output) = try runProgram(try noladExecutable(), ["embed-image", "--threads", "1", "--model", model]
                                              + cases.map { repository.appendingPathComponent($0.file).path })
        XCTAssertEqual(status, 0, output)
        let lines = output.split(separator: "\n").filter { $0.hasPrefix("{") }
        XCTAssertEqual(lines.count, cases.count, output)
        for (line, c) in zip(lines, cases) {
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            XCTAssertEqual(object["file"] as? String, repository.appendingPathComponent(c.file).path)
            let embedding = try XCTUnwrap(object["embedding"] as? [Double]).map(Float.init)
            let scale = c.embedding.map(abs).max() ?? 1
            let maxError = zip(embedding, c.embedding).map { abs($0 - $1) }.max() ?? .infinity
            print("embed-image dinov2-518 (processor 256/224) \(c.file): max abs error \(maxError) (output scale \(scale), tolerance \(1e-4 * scale))")
            XCTAssertEqual(embedding.count, c.embedding.count)
            XCTAssertLessThanOrEqual(maxError, 1e-4 * scale, c.file)
        }
        // --view dino ignores the processor: shorter side 592, crop 518 from image_size, so another embedding.
        let (dinoStatus, dinoOutput) = try runProgram(try noladExecutable(), ["embed-image", "--threads", "1", "--view", "dino", "--model", model,
                                                                              repository.appendingPathComponent(cases[0].file).path])
        XCTAssertEqual(dinoStatus, 0, dinoOutput)
        let line = try XCTUnwrap(dinoOutput.split(separator: "\n").first { $0.hasPrefix("{") }, dinoOutput)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let other = try XCTUnwrap(object["embedding"] as? [Double]).map(Float.init)
        let difference = zip(other, cases[0].embedding).map { abs($0 - $1) }.max() ?? 0
        XCTAssertGreaterThan(difference, 1e-2 * (cases[0].embedding.map(abs).max() ?? 1))
    }

    /// A preprocessor_config.json nolad cannot follow: the command fails before any image, naming the file and why.
    func testEmbedImage_withUnsupportedPreprocessorConfig_failsWithASentence() throws {
        let source = repository.appendingPathComponent("Demo/models/tiny-clip")
        let folder = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("nolad-embed-processor-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        // Links to the model's files, but a file of our own as preprocessor_config.json (never written through a link).
        for name in try FileManager.default.contentsOfDirectory(atPath: source.path) where name != "preprocessor_config.json" {
            try FileManager.default.createSymbolicLink(at: folder.appendingPathComponent(name), withDestinationURL: source.appendingPathComponent(name))
        }
        let processor = folder.appendingPathComponent("preprocessor_config.json")
        try Data(#"{"image_processor_type": "CLIPImageProcessor", "resample": 1, "size": {"shortest_edge": 224}}"#.utf8).write(to: processor)
        let (status, output) = try runProgram(try noladExecutable(), [
            "embed-image", "--model", folder.path, repository.appendingPathComponent("Demo/collection/sunset/000.jpg").path,
        ])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("nolad embed-image: bad model config \(processor.path): resample 1 (LANCZOS) is not supported"), output)
        XCTAssertFalse(output.contains("\"embedding\""), output)
    }

    func testEmbedImage_onCorruptFile_failsNamingIt() throws {
        let bad = NSTemporaryDirectory() + "nolad-not-an-image-\(UUID().uuidString).jpg"
        try Data("plain text".utf8).write(to: URL(fileURLWithPath: bad))
        defer { try? FileManager.default.removeItem(atPath: bad) }
        let (status, output) = try runProgram(try noladExecutable(), [
            "embed-image", "--model", repository.appendingPathComponent("Demo/models/tiny-clip").path, bad,
        ])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains(bad), output)
    }

    /// JSON has no NaN: an input (or damaged weights) giving non-finite values is a sentence on stderr,
    /// not a crash in the JSON writer.
    func testEmbedImage_whenTheEmbeddingIsNotFinite_failsWithASentence() throws {
        let model = repository.appendingPathComponent("Demo/models/tiny-clip").path
        let size = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: model + "/config.json"))) as? [String: Any])
            .flatMap { $0["vision_config"] as? [String: Any] }?["image_size"] as? Int)
        let raw = NSTemporaryDirectory() + "nolad-nan-\(UUID().uuidString).f32"
        var bytes: [UInt8] = []
        for _ in 0..<(3 * size * size) { withUnsafeBytes(of: Float.nan.bitPattern.littleEndian) { bytes.append(contentsOf: $0) } }
        try Data(bytes).write(to: URL(fileURLWithPath: raw))
        defer { try? FileManager.default.removeItem(atPath: raw) }
        let (status, output) = try runProgram(try noladExecutable(), ["embed-image", "--model", model, raw])
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("nolad embed-image: \(raw): the embedding has NaN or infinite values (damaged model weights or input)"), output)
    }

    /// The CLI loads models as the daemon does: a vocab.json larger than the config's vocab_size is a
    /// sentence on stderr, not the token embedding's bounds precondition.
    func testEmbedText_whenVocabularyOutgrowsTheModel_failsWithASentence() throws {
        let folder = NSTemporaryDirectory() + "nolad-small-vocab-\(UUID().uuidString)"
        try FileManager.default.copyItem(atPath: repository.appendingPathComponent("Demo/models/tiny-clip").path, toPath: folder)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let vocabURL = URL(fileURLWithPath: folder + "/vocab.json")
        var vocab = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: vocabURL)) as? [String: Int])
        let size = vocab.count
        vocab["zzzextra</w>"] = size
        try JSONSerialization.data(withJSONObject: vocab).write(to: vocabURL)
        let (status, output) = try runProgram(try noladExecutable(), ["embed-text", "--model", folder, "zzzextra"])
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("nolad embed-text: bad model config \(folder)/vocab.json: token id \(size) is outside config.json's text_config.vocab_size \(size)"), output)
    }
}
