import Foundation
import XCTest
@testable import Method

final class DescriptionsTests: XCTestCase {
    let classes = ["golden_retriever", "tabby cat", "sailboat"]

    func parseError(_ json: String) -> MethodError? {
        do { _ = try ClassDescriptions.parse(Data(json.utf8), classes: classes); return nil } catch { return error as? MethodError }
    }

    func testParse_whenCuPLFormat_keepsSentencesInOrder() throws {
        let d = try ClassDescriptions.parse(Data(#"{"tabby cat": [" A cat with stripes. ", "An M on its forehead."]}"#.utf8), classes: classes)
        XCTAssertEqual(d, ["tabby cat": ["A cat with stripes.", "An M on its forehead."]])
    }

    func testParse_whenInvalid_namesClassAndReason() {
        var e = parseError(#"{"dog": ["x y"]}"#)
        XCTAssertEqual(e?.code, .badDescriptions); XCTAssertEqual(e?.subject, "dog"); XCTAssertEqual(e?.reason, "not a class of this job")
        e = parseError(#"{"sailboat": []}"#)
        XCTAssertEqual(e?.subject, "sailboat"); XCTAssertEqual(e?.reason, "empty list of sentences")
        e = parseError(#"{"sailboat": ["a boat.", 3]}"#)
        XCTAssertEqual(e?.subject, "sailboat"); XCTAssertEqual(e?.reason, "item 1 is an integer, not a string")
        e = parseError(#"{"sailboat": "a boat."}"#)
        XCTAssertEqual(e?.reason, "expected a list of sentences, found a string")
        e = parseError(#"{"sailboat": ["  "]}"#)
        XCTAssertEqual(e?.reason, "item 0 is blank")
        e = parseError(#"["a"]"#)
        XCTAssertEqual(e?.subject, "descriptions")
        e = parseError("{")
        XCTAssertEqual(e?.reason, "not valid JSON")
    }

    func testSentences_whenClassHasNoDescriptions_fallsBackToTemplates() {
        let s = ClassDescriptions.sentences(classes: classes, descriptions: ["sailboat": ["A boat with sails."]], templates: true)
        XCTAssertEqual(s[0], PromptTemplates.sentences(for: "golden_retriever"))
        XCTAssertEqual(s[0][0], "a photo of a golden retriever.")
        XCTAssertEqual(s[2].first, "A boat with sails.")
        XCTAssertEqual(s[2].count, 1 + PromptTemplates.all.count)
        let off = ClassDescriptions.sentences(classes: classes, descriptions: ["sailboat": ["A boat with sails."]], templates: false)
        XCTAssertEqual(off[2], ["A boat with sails."])
        XCTAssertEqual(off[1].count, PromptTemplates.all.count)
    }

    func testBuildClassifier_whenZeroEmbedding_throwsNamingClass() {
        XCTAssertThrowsError(try buildClassifier(embeddings: [[1, 0], [0, 0]], dimension: 2)) { error in
            XCTAssertEqual((error as? MethodError)?.subject, "class 1")
        }
        XCTAssertThrowsError(try buildClassifier(embeddings: [[]], dimension: 2))
    }

    func testSentencesFromReply_splitsListsAndSentences() {
        let reply = """
        1. A large dog with a golden coat. It has floppy ears!
        - "friendly face"
        * Wet nose
        Is it fluffy? Yes
        """
        XCTAssertEqual(DescriptionClient.sentences(fromReply: reply),
                       ["A large dog with a golden coat.", "It has floppy ears!", "friendly face.", "Wet nose.", "Is it fluffy?"])
    }
}
