import Foundation
import XCTest

/// `nolad embed-image` on real JPEGs with the bundled demo models (Demo/models), against transformers
/// on torchvision's preprocessing of Pillow's decoded image (reference/make_cli_fixtures.py).
final class EmbedImageCommandTests: XCTestCase {
    struct Case: Decodable { let model: String; let file: String; let view: String; let embedding: [Float] }
    struct Fixture: Decodable { let cases: [Case] }

    let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func testEmbedImage_onDemoJPEGs_matchesTransformers() throws {
        let data = try Data(contentsOf: pipelineFixtures.appendingPathComponent("embed_image.json"))
        let fixture = try JSONDecoder().decode(Fixture.self, from: data)
        XCTAssertEqual(fixture.cases.count, 6)
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
