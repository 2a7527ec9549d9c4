import Foundation
import XCTest
@testable import Models

/// Fixtures from reference/make_checkpoint_fixtures.py (torch 2.15, safetensors 0.8).
private let checkpoints = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Fixtures/checkpoints")

/// expected.json: name → shape, torch dtype and (for float tensors) the float32 bit patterns torch gives.
private struct Expected {
    let shape: [Int]
    let dtype: String
    let bits: [UInt32]?
}

private func loadExpected() throws -> [String: Expected] {
    let data = try Data(contentsOf: checkpoints.appendingPathComponent("expected.json"))
    let json = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: [String: Any]])
    var result: [String: Expected] = [:]
    for (name, entry) in json {
        let shape = try XCTUnwrap(entry["shape"] as? [Int])
        let dtype = try XCTUnwrap(entry["dtype"] as? String)
        let bits = (entry["bits"] as? [Int]).map { $0.map { UInt32(bitPattern: Int32($0)) } }
        result[name] = Expected(shape: shape, dtype: dtype, bits: bits)
    }
    return result
}

/// Asserts that `source` holds exactly the fixture state dict, value for value: bit patterns, so -0,
/// subnormals and infinities count; any NaN matches any NaN (torch's own half → float canonicalises
/// the payload to 0x7fffffff, numpy and F16C keep it as we do). Tolerance: 0 differing values.
private func assertMatchesFixture(_ source: TensorSource, label: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let expected = try loadExpected()
    XCTAssertEqual(Set(source.tensorNames), Set(expected.keys), label, file: file, line: line)
    var compared = 0
    var mismatches = 0
    for (name, want) in expected {
        XCTAssertEqual(source.shape(of: name), want.shape, "\(label) \(name)", file: file, line: line)
        guard let bits = want.bits else { continue }
        let values = try source.floats(name)
        XCTAssertEqual(values.count, bits.count, "\(label) \(name)", file: file, line: line)
        for (value, expectedBits) in zip(values, bits)
        where value.bitPattern != expectedBits && !(value.isNaN && Float(bitPattern: expectedBits).isNaN) {
            mismatches += 1
            if mismatches <= 5 {
                XCTFail("\(label) \(name): got \(value) (0x\(String(value.bitPattern, radix: 16))), want \(Float(bitPattern: expectedBits)) (0x\(String(expectedBits, radix: 16)))", file: file, line: line)
            }
        }
        compared += values.count
    }
    print("\(label): \(compared) values compared bit for bit, \(mismatches) differ (tolerance 0)")
    XCTAssertEqual(mismatches, 0, file: file, line: line)
    XCTAssertGreaterThan(compared, 100, file: file, line: line)
}

private func assertThrows(_ expected: CheckpointError, file: StaticString = #filePath, line: UInt = #line,
                          _ body: () throws -> Void) {
    do {
        try body()
        XCTFail("no error; expected \(expected)", file: file, line: line)
    } catch let error as CheckpointError {
        XCTAssertEqual(error, expected, file: file, line: line)
    } catch {
        XCTFail("unexpected error \(error); expected \(expected)", file: file, line: line)
    }
}

final class CheckpointTests: XCTestCase {
    private func path(_ relative: String) -> String { checkpoints.appendingPathComponent(relative).path }

    // MARK: safetensors

    func testSafeTensors_readsF32F16BF16_bitExactWithTorch() throws {
        let source = try SafeTensorsFile(path: path("good/model.safetensors"))
        try assertMatchesFixture(source, label: "model.safetensors")
        XCTAssertEqual(source.metadata, ["format": "pt", "note": "fixture"])
        XCTAssertEqual(source.dtype(of: "half"), "F16")
        XCTAssertEqual(source.dtype(of: "bf16"), "BF16")
        XCTAssertEqual(source.dtype(of: "logit_scale"), "F32")
    }

    func testSafeTensors_whenIntegerTensorReadAsFloats_throwsUnsupportedDType() throws {
        let source = try SafeTensorsFile(path: path("good/model.safetensors"))
        XCTAssertEqual(source.shape(of: "position_ids"), [1, 7])
        assertThrows(.unsupportedDType(name: "position_ids", dtype: "I64")) { _ = try source.floats("position_ids") }
        assertThrows(.missingTensor("nope")) { _ = try source.floats("nope") }
    }

    func testSafeTensors_whenFileIsBroken_throwsNamedError() {
        let cases: [(String, String)] = [
            ("bad/truncated.safetensors", "tensor 'half_transposed' data [396, 408) runs past the end of the data (398 bytes; file truncated?)"),
            ("bad/truncated_header.safetensors", "header length 976 runs past the end of the file (40 bytes)"),
            ("bad/size_mismatch.safetensors", "tensor 'w' has 12 bytes, its F32 shape [2, 2] needs 16"),
            ("bad/hole.safetensors", "hole in the data before tensor 'b'"),
            ("bad/not_json.safetensors", "header is not valid JSON"),
        ]
        for (file, reason) in cases {
            assertThrows(.unreadable(file: path(file), reason: reason)) { _ = try SafeTensorsFile(path: path(file)) }
        }
        assertThrows(.unsupportedDType(name: "w", dtype: "Q4")) { _ = try SafeTensorsFile(path: path("bad/unknown_dtype.safetensors")) }
        assertThrows(.missingFile(path("bad/none.safetensors"))) { _ = try SafeTensorsFile(path: path("bad/none.safetensors")) }
    }

    func testSafeTensorsWriter_output_followsFormatAndReadsBack() throws {
        let values: [Float] = [1, -2.5, .infinity, -.infinity, .nan, -0.0, .leastNonzeroMagnitude, .greatestFiniteMagnitude]
        let tensors: [(name: String, shape: [Int], values: [Float])] = [
            ("prompts", [2, 4], values),
            ("scale", [], [4.6052]),
            ("a \"quoted\"\nname/ü", [3], [1, 2, 3]),
            ("empty", [0, 5], []),
        ]
        let metadata = ["backbone": "openai/clip-vit-base-patch32", "note": "tab\there \"q\" \\ é"]
        let bytes = writeSafeTensors(tensors: tensors, metadata: metadata)

        // Format rules: u64 LE header length, multiple of 8, JSON object padded with spaces, data right after.
        let headerLength = bytes[0..<8].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        XCTAssertEqual(headerLength % 8, 0)
        XCTAssertEqual(bytes.count, 8 + headerLength + 4 * (8 + 1 + 3))
        let headerText = String(decoding: bytes[8 ..< 8 + headerLength], as: UTF8.self)
        XCTAssertTrue(headerText.hasPrefix("{"))
        XCTAssertTrue(headerText.trimmingCharacters(in: .whitespaces).hasSuffix("}"))
        let header = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(bytes[8 ..< 8 + headerLength])) as? [String: Any])
        XCTAssertEqual(header["__metadata__"] as? [String: String], metadata)
        let prompts = try XCTUnwrap(header["prompts"] as? [String: Any])
        XCTAssertEqual(prompts["dtype"] as? String, "F32")
        XCTAssertEqual(prompts["shape"] as? [Int], [2, 4])
        XCTAssertEqual(prompts["data_offsets"] as? [Int], [0, 32])

        let url = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-writer-\(getpid()).safetensors")
        try Data(bytes).write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        let source = try SafeTensorsFile(url: url)
        XCTAssertEqual(source.metadata, metadata)
        XCTAssertEqual(Set(source.tensorNames), Set(tensors.map(\.name)))
        for tensor in tensors {
            XCTAssertEqual(source.shape(of: tensor.name), tensor.shape)
            XCTAssertEqual(try source.floats(tensor.name).map(\.bitPattern), tensor.values.map(\.bitPattern), tensor.name)
        }
    }

    // MARK: pytorch_model.bin

    func testTorchCheckpoint_readsStridedSharedAndHalfTensors_bitExactWithTorch() throws {
        for folder in ["good", "archive_prefix", "zip64", "proto4"] {
            let source = try TorchCheckpointFile(path: path("\(folder)/pytorch_model.bin"))
            try assertMatchesFixture(source, label: "\(folder)/pytorch_model.bin")
        }
    }

    func testTorchCheckpoint_whenIntegerTensorReadAsFloats_throwsUnsupportedDType() throws {
        let source = try TorchCheckpointFile(path: path("good/pytorch_model.bin"))
        XCTAssertEqual(source.dtype(of: "position_ids"), "torch.LongStorage")
        XCTAssertEqual(source.dtype(of: "half"), "torch.HalfStorage")
        assertThrows(.unsupportedDType(name: "position_ids", dtype: "torch.LongStorage")) { _ = try source.floats("position_ids") }
        assertThrows(.missingTensor("nope")) { _ = try source.floats("nope") }
    }

    func testTorchCheckpoint_whenPickleNamesForbiddenGlobal_refusesWithoutRunningIt() {
        assertThrows(.unreadable(file: path("bad/forbidden_global.bin"),
                                 reason: "data.pkl: refusing global 'os.system': a state dict references only tensors, storages and OrderedDict")) {
            _ = try TorchCheckpointFile(path: path("bad/forbidden_global.bin"))
        }
        assertThrows(.unreadable(file: path("bad/forbidden_stack_global.bin"),
                                 reason: "data.pkl: refusing global 'builtins.eval': a state dict references only tensors, storages and OrderedDict")) {
            _ = try TorchCheckpointFile(path: path("bad/forbidden_stack_global.bin"))
        }
    }

    func testTorchCheckpoint_whenArchiveIsBroken_throwsNamedError() {
        let cases: [(String, String)] = [
            ("bad/truncated.bin", "not a zip archive (no end of central directory record; the legacy non-zip torch.save format is not supported)"),
            ("bad/legacy.bin", "not a zip archive (no end of central directory record; the legacy non-zip torch.save format is not supported)"),
            ("bad/compressed.bin", "entry 'archive/byteorder' is compressed (method 8); only stored entries are supported"),
            ("bad/missing_storage.bin", "storage '0' has no entry 'archive/data/0'"),
        ]
        for (file, reason) in cases {
            assertThrows(.unreadable(file: path(file), reason: reason)) { _ = try TorchCheckpointFile(path: path(file)) }
        }
    }

    // MARK: corrupted files

    /// Seeded corruptions of real files (truncation, flipped bytes, saturated words): every reader
    /// call ends in a value or a CheckpointError, never a crash or another error type.
    func testReaders_whenFilesAreCorruptedAtRandom_throwCheckpointErrorsOrRead_neverCrash() throws {
        var rng = SplitMix64(seed: 7)
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-corrupt-\(getpid())")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        var opened = 0, refused = 0, readErrors = 0
        for original in ["good/model.safetensors", "good/pytorch_model.bin", "zip64/pytorch_model.bin"] {
            let bytes = [UInt8](try Data(contentsOf: checkpoints.appendingPathComponent(original)))
            for trial in 0 ..< 150 {
                var mutated = bytes
                switch trial % 3 {
                case 0:
                    mutated.removeSubrange(Int(rng.next() % UInt64(bytes.count))...)
                case 1:
                    for _ in 0 ... rng.next() % 4 { mutated[Int(rng.next() % UInt64(bytes.count))] ^= UInt8(1 + rng.next() % 255) }
                default:
                    let at = Int(rng.next() % UInt64(bytes.count - 8))
                    for k in 0 ..< 8 { mutated[at + k] = 0xFF }
                }
                let url = scratch.appendingPathComponent("\(trial)-" + original.replacingOccurrences(of: "/", with: "-"))
                try Data(mutated).write(to: url)
                do {
                    let source: TensorSource = original.hasSuffix(".safetensors") ? try SafeTensorsFile(url: url) : try TorchCheckpointFile(url: url)
                    opened += 1
                    for name in source.tensorNames {
                        do { _ = try source.floats(name) } catch is CheckpointError { readErrors += 1 }
                    }
                } catch is CheckpointError {
                    refused += 1
                }
                try FileManager.default.removeItem(at: url)
            }
        }
        print("corrupted files: \(refused) refused on open, \(opened) opened (\(readErrors) tensor reads refused)")
        XCTAssertGreaterThan(refused, 150)
    }

    // MARK: model folders

    func testOpenCheckpoint_prefersSafeTensors_thenPytorchBin_elseNamesEveryFileLookedFor() throws {
        XCTAssertTrue(try openCheckpoint(folder: checkpoints.appendingPathComponent("good")) is SafeTensorsFile)
        XCTAssertTrue(try openCheckpoint(folder: checkpoints.appendingPathComponent("zip64")) is TorchCheckpointFile)
        let empty = checkpoints.appendingPathComponent("bad/empty_folder").path
        assertThrows(.missingFile("\(empty)/model.safetensors or \(empty)/model.safetensors.index.json or \(empty)/pytorch_model.bin or \(empty)/pytorch_model.bin.index.json")) {
            _ = try openCheckpoint(folder: URL(fileURLWithPath: empty))
        }
    }

    func testOpenCheckpoint_whenShardedWithIndex_readsEveryShard() throws {
        for folder in ["sharded", "sharded_bin"] {
            let source = try openCheckpoint(folder: checkpoints.appendingPathComponent(folder))
            XCTAssertTrue(source is ShardedCheckpoint)
            try assertMatchesFixture(source, label: folder)
            assertThrows(.missingTensor("nope")) { _ = try source.floats("nope") }
        }
    }

    func testReadConfig_readsObject_orNamesMissingFile() throws {
        XCTAssertTrue(try readConfig(folder: checkpoints.appendingPathComponent("bad/empty_folder")).isEmpty)
        let good = checkpoints.appendingPathComponent("good")
        assertThrows(.missingFile(good.appendingPathComponent("config.json").path)) { _ = try readConfig(folder: good) }
    }
}

/// A small seeded generator, so the corruptions are the same on every run.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
