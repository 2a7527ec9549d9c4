import Foundation
import XCTest
@testable import Models

/// vocab.json + merges.txt built from OpenAI's BPE file, and transformers 5.24 CLIPTokenizer's ids for
/// hard strings (reference/make_tokenizer_fixtures.py).
private let tokenizerFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent("Fixtures/tokenizer")

private struct Case {
    let text: String
    let ids: [Int]        // transformers, untruncated
    let ids77: [Int]      // transformers, truncation=True, max_length=77
    let openCLIP: [Int]
    let agree: Bool
}

private func loadCases() throws -> [Case] {
    let data = try Data(contentsOf: tokenizerFolder.appendingPathComponent("cases.json"))
    let json = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [[String: Any]])
    var cases: [Case] = []
    for entry in json {
        let text: String = try XCTUnwrap(entry["text"] as? String)
        let ids: [Int] = try XCTUnwrap(entry["ids"] as? [Int])
        let ids77: [Int] = try XCTUnwrap(entry["ids77"] as? [Int])
        let openCLIP: [Int] = try XCTUnwrap(entry["open_clip"] as? [Int])
        let agree: Bool = try XCTUnwrap(entry["agree"] as? Bool)
        cases.append(Case(text: text, ids: ids, ids77: ids77, openCLIP: openCLIP, agree: agree))
    }
    return cases
}

final class TokenizerTests: XCTestCase {
    private static var shared: CLIPTokenizer?

    private func tokenizer() throws -> CLIPTokenizer {
        if let shared = Self.shared { return shared }
        let loaded = try CLIPTokenizer(folder: tokenizerFolder)
        Self.shared = loaded
        return loaded
    }

    func testEncode_hardStrings_giveTransformersIDs() throws {
        let tokenizer = try tokenizer()
        let cases = try loadCases()
        XCTAssertGreaterThan(cases.count, 50)
        var differing = 0
        for c in cases {
            let ids = tokenizer.encode(c.text, contextLength: nil)
            if ids != c.ids {
                differing += 1
                XCTFail("\(c.text.debugDescription): got \(ids), transformers gives \(c.ids)")
            }
        }
        print("tokenizer: \(cases.count) strings, \(differing) differ from transformers' ids (tolerance 0)")
        XCTAssertEqual(differing, 0)
    }

    func testEncode_withContextLength77_truncatesKeepingEOS_likeTransformers() throws {
        let tokenizer = try tokenizer()
        var truncated = 0
        for c in try loadCases() {
            let ids = tokenizer.encode(c.text)
            XCTAssertEqual(ids, c.ids77, c.text.debugDescription)
            XCTAssertLessThanOrEqual(ids.count, 77)
            XCTAssertEqual(ids.first, 49406)
            XCTAssertEqual(ids.last, 49407)
            if c.ids.count > 77 { truncated += 1 }
        }
        XCTAssertGreaterThanOrEqual(truncated, 2, "fixtures must include over-long texts")
        let short: [Int] = [49406, 320, 49407]
        XCTAssertEqual(tokenizer.encode("a photo of a cat", contextLength: 3), short)
    }

    func testEncode_whereOpenCLIPCleansAlike_givesOpenCLIPIDs() throws {
        let tokenizer = try tokenizer()
        let cases = try loadCases().filter { $0.agree }
        XCTAssertGreaterThan(cases.count, 30)
        for c in cases {
            XCTAssertEqual(tokenizer.encode(c.text, contextLength: nil), c.openCLIP, c.text.debugDescription)
        }
    }

    func testSpecialIDs_comeFromVocabulary() throws {
        let tokenizer = try tokenizer()
        XCTAssertEqual(tokenizer.bosID, 49406)
        XCTAssertEqual(tokenizer.eosID, 49407)
        XCTAssertEqual(tokenizer.vocabulary.count, 49408)
        let empty: [Int] = [49406, 49407]
        XCTAssertEqual(tokenizer.encode(""), empty)
    }

    func testInit_whenFilesMissingOrBroken_throwsNamedError() throws {
        let emptyFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Fixtures/checkpoints/bad/empty_folder")
        XCTAssertThrowsError(try CLIPTokenizer(folder: emptyFolder)) { error in
            XCTAssertEqual(error as? CheckpointError, .missingFile(emptyFolder.appendingPathComponent("vocab.json").path))
        }
        XCTAssertThrowsError(try CLIPTokenizer(vocabulary: ["a": 0], merges: [], source: "x")) { error in
            XCTAssertEqual(error as? CheckpointError, .badConfig(file: "x", reason: "vocabulary has no <|startoftext|>"))
        }
        var vocabulary: [String: Int] = ["<|startoftext|>": 0, "<|endoftext|>": 1]
        for (i, symbol) in byteSymbols.enumerated() {
            let text = String(symbol)
            vocabulary[text] = 2 + i
            vocabulary[text + "</w>"] = 258 + i
        }
        XCTAssertThrowsError(try CLIPTokenizer(vocabulary: vocabulary, merges: [("a", "b</w>")], source: "x")) { error in
            XCTAssertEqual(error as? CheckpointError, .badConfig(file: "x", reason: "merge 1 'a b</w>' uses a token missing from the vocabulary"))
        }
        vocabulary["ab</w>"] = 600
        let tiny = try CLIPTokenizer(vocabulary: vocabulary, merges: [("a", "b</w>")], source: "x")
        let a: Int = vocabulary["a"]!
        let b: Int = vocabulary["b"]!
        let c: Int = vocabulary["c</w>"]!
        let bang: Int = vocabulary["!</w>"]!
        let expected: [Int] = [0, 600, a, b, c, bang, 1]
        XCTAssertEqual(tiny.encode("AB abc!", contextLength: nil), expected)
    }

    func testCheckFits_whenVocabularyLargerThanConfigVocabSize_throwsSentenceNamingVocabJSON() throws {
        var vocabulary: [String: Int] = ["<|startoftext|>": 0, "<|endoftext|>": 1]
        for (i, symbol) in byteSymbols.enumerated() {
            vocabulary[String(symbol)] = 2 + i
            vocabulary[String(symbol) + "</w>"] = 258 + i
        }
        let tokenizer = try CLIPTokenizer(vocabulary: vocabulary, merges: [], source: "m")
        var text = CLIPTextConfig()
        text.vocabSize = 514
        XCTAssertNoThrow(try tokenizer.checkFits(text, source: "m"))
        text.vocabSize = 513
        XCTAssertThrowsError(try tokenizer.checkFits(text, source: "m")) { error in
            XCTAssertEqual(error as? CheckpointError, .badConfig(file: "m/vocab.json",
                reason: "token id 513 is outside config.json's text_config.vocab_size 513; vocab.json and config.json do not belong to the same model"))
        }
    }
}
