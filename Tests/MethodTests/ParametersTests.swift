import Foundation
import XCTest
@testable import Method

final class ParametersTests: XCTestCase {
    func decode(_ json: String) throws -> NolaParameters { try NolaParameters(json: Data(json.utf8)) }

    func expectError(_ json: String, key: String, reason: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try decode(json), file: file, line: line) { error in
            guard let e = error as? MethodError else { return XCTFail("not a MethodError: \(error)", file: file, line: line) }
            XCTAssertEqual(e.code, .badParameter, file: file, line: line)
            XCTAssertEqual(e.subject, key, file: file, line: line)
            XCTAssertTrue(e.description.contains(reason), "'\(e.description)' lacks '\(reason)'", file: file, line: line)
        }
    }

    func testDecode_whenEmptyOrNull_givesReferenceDefaults() throws {
        for json in ["", "  ", "null", "{}"] {
            let p = try decode(json)
            XCTAssertEqual(p, NolaParameters())
        }
        let p = NolaParameters()
        XCTAssertEqual(p.minK, 16); XCTAssertEqual(p.kFraction, 0.2)
        XCTAssertEqual(p.alignmentEpochs, 50); XCTAssertEqual(p.alignmentLearningRate, 1e-3)
        XCTAssertEqual(p.alignmentBatchSize, 32); XCTAssertEqual(p.alignmentHiddenSize, 256)
        XCTAssertEqual(p.promptLearningRate, 0.004); XCTAssertEqual(p.promptWeightDecay, 0.01)
        XCTAssertEqual(p.promptBatchSize, 512); XCTAssertEqual(p.promptCount, 16); XCTAssertEqual(p.labelSmoothing, 0.1)
        XCTAssertEqual(p.promptMicroBatchSize, 16); XCTAssertTrue(p.templates); XCTAssertTrue(p.colourJitter)
        XCTAssertEqual(p.promptViewBudget, NolaParameters.defaultPromptViewBudget)
        XCTAssertEqual(p.clipModel, "clip-vit-base-patch32"); XCTAssertEqual(p.dinoModel, "dino-vitb16")
    }

    func testDecode_whenEveryKeyGiven_setsEveryField() throws {
        let p = try decode("""
        {"seed": 3, "templates": false, "min_k": 8, "k_fraction": 0.5, "alignment_epochs": 5, "alignment_lr": 0.01,
         "alignment_batch_size": 16, "alignment_hidden_size": 64, "prompt_epochs": 2, "prompt_lr": 1,
         "prompt_weight_decay": 0, "prompt_batch_size": 64, "prompt_micro_batch_size": 8, "prompt_count": 4,
         "label_smoothing": 0, "colour_jitter": false, "clip_model": "clip-b16", "dino_model": "dino-s16",
         "stop_patience": 4, "stop_tolerance": 0.5, "prompt_view_budget": 4000}
        """)
        XCTAssertEqual(p.seed, 3); XCTAssertFalse(p.templates); XCTAssertEqual(p.minK, 8); XCTAssertEqual(p.kFraction, 0.5)
        XCTAssertEqual(p.alignmentEpochs, 5); XCTAssertEqual(p.alignmentLearningRate, 0.01); XCTAssertEqual(p.alignmentBatchSize, 16)
        XCTAssertEqual(p.alignmentHiddenSize, 64); XCTAssertEqual(p.promptEpochs, 2); XCTAssertEqual(p.promptLearningRate, 1)
        XCTAssertEqual(p.promptWeightDecay, 0); XCTAssertEqual(p.promptBatchSize, 64); XCTAssertEqual(p.promptMicroBatchSize, 8)
        XCTAssertEqual(p.promptCount, 4); XCTAssertEqual(p.labelSmoothing, 0); XCTAssertFalse(p.colourJitter)
        XCTAssertEqual(p.clipModel, "clip-b16"); XCTAssertEqual(p.dinoModel, "dino-s16")
        XCTAssertEqual(p.stopPatience, 4); XCTAssertEqual(p.stopTolerance, 0.5); XCTAssertEqual(p.promptViewBudget, 4000)
        XCTAssertEqual(Set(NolaParameters.Key.allCases.map(\.rawValue)).count, 24)
        XCTAssertNil(try decode(#"{"prompt_view_budget": null}"#).promptViewBudget, "null: no cap")
    }

    func testDecode_whenBadInput_namesTheKeyTheAllowedValuesAndTheValueAsWritten() {
        expectError("[1]", key: "parameters", reason: "must be a JSON object, got [1]")
        expectError("{oops", key: "parameters", reason: "not valid JSON")
        expectError(#"{"epochs": 3}"#, key: "epochs", reason: "unknown parameter (known: seed, templates, min_k")
        expectError(#"{"prompt_epochs": "3"}"#, key: "prompt_epochs", reason: #"must be an integer from 0 to 10000, got "3""#)
        expectError(#"{"prompt_epochs": 2.5}"#, key: "prompt_epochs", reason: "must be an integer from 0 to 10000, got 2.5")
        expectError(#"{"prompt_epochs": -1}"#, key: "prompt_epochs", reason: "got -1")
        expectError(#"{"prompt_count": true}"#, key: "prompt_count", reason: "must be an integer from 1 to 1024, got true")
        expectError(#"{"prompt_lr": 0}"#, key: "prompt_lr", reason: "must be a number greater than 0 and at most 1, got 0")
        expectError(#"{"k_fraction": 1.5}"#, key: "k_fraction", reason: "must be a number from 0 to 1, got 1.5")
        expectError(#"{"label_smoothing": 1}"#, key: "label_smoothing", reason: "must be a number at least 0 and below 1, got 1")
        expectError(#"{"templates": 1}"#, key: "templates", reason: "must be true or false, got 1")
        expectError(#"{"colour_jitter": "no"}"#, key: "colour_jitter", reason: #"must be true or false, got "no""#)
        expectError(#"{"abstain_below": 1.5}"#, key: "abstain_below", reason: "must be a number from 0 to 1, got 1.5")
        expectError(#"{"abstain_margin_below": -0.1}"#, key: "abstain_margin_below", reason: "must be a number from 0 to 1, got -0.1")
        expectError(#"{"abstain_unless_agree": 1}"#, key: "abstain_unless_agree", reason: "must be true or false, got 1")
        expectError(#"{"seed": -4}"#, key: "seed", reason: "must be an integer at least 0, got -4")
        expectError(#"{"clip_model": "../etc"}"#, key: "clip_model", reason: #"must be a plain folder name (no '/', not starting with '.'), got "../etc""#)
        expectError(#"{"dino_model": 7}"#, key: "dino_model", reason: "got 7")
        expectError(#"{"prompt_micro_batch_size": 0}"#, key: "prompt_micro_batch_size", reason: "from 1 to 1000000, or null, got 0")
        expectError(#"{"min_k": [1, {"a": "x\ny"}]}"#, key: "min_k", reason: #"got [1, {"a": "x\ny"}]"#)
        // prompts_from_job is the daemon's: NolaParameters alone does not know it, JobParameters does.
        expectError(#"{"prompts_from_job": 3}"#, key: "prompts_from_job", reason: "unknown parameter")
        XCTAssertThrowsError(try JobParameters(json: Data(#"{"prompts_from_job": -3}"#.utf8))) { error in
            XCTAssertEqual("\(error)", "parameter 'prompts_from_job': must be an integer at least 1, got -3")
        }
    }

    func testJobParameters_takesPromptsFromJobAndRemembersWhichKeysWereGiven() throws {
        let job = try JobParameters(json: Data(#"{"prompts_from_job": 12, "clip_model": "clip-b16", "prompt_micro_batch_size": null}"#.utf8))
        XCTAssertEqual(job.promptsFromJob, 12)
        XCTAssertEqual(job.given, ["prompts_from_job", "clip_model", "prompt_micro_batch_size"])
        XCTAssertEqual(job.method.clipModel, "clip-b16")
        XCTAssertEqual(job.method.promptMicroBatchSize, defaultPromptMicroBatchSize, "null is the fixed default")
        XCTAssertEqual(try JobParameters(json: Data()).method, NolaParameters())
    }

    func testJobParameters_takesThreads_andRefusesOutOfRangeInASentence() throws {
        let job = try JobParameters(json: Data(#"{"threads": 3, "seed": 1}"#.utf8))
        XCTAssertEqual(job.threads, 3)
        XCTAssertEqual(job.method.seed, 1)
        XCTAssertNil(try JobParameters(json: Data(#"{"seed": 1}"#.utf8)).threads)
        expectError(#"{"threads": 3}"#, key: "threads", reason: "unknown parameter")
        for bad in ["0", "1025", "2.5", "\"4\""] {
            XCTAssertThrowsError(try JobParameters(json: Data("{\"threads\": \(bad)}".utf8))) { error in
                XCTAssertEqual("\(error)", "parameter 'threads': must be an integer from 1 to 1024, got \(bad)")
            }
        }
    }

    func testJobParameters_onlyNew_onlyWithPromptsFromJob_andTheStopRuleParameters() throws {
        let job = try JobParameters(json: Data(#"{"prompts_from_job": 4, "only_new": true}"#.utf8))
        XCTAssertEqual(job.promptsFromJob, 4)
        XCTAssertTrue(job.onlyNew)
        XCTAssertFalse(try JobParameters(json: Data(#"{"prompts_from_job": 4}"#.utf8)).onlyNew)
        XCTAssertFalse(try JobParameters(json: Data(#"{"only_new": false}"#.utf8)).onlyNew)
        XCTAssertThrowsError(try JobParameters(json: Data(#"{"only_new": true}"#.utf8))) { error in
            XCTAssertEqual("\(error)", "parameter 'only_new': is true only with prompts_from_job (the earlier job whose labels and tuned prompts it reuses)")
        }
        XCTAssertThrowsError(try JobParameters(json: Data(#"{"prompts_from_job": 4, "only_new": 1}"#.utf8))) { error in
            XCTAssertEqual("\(error)", "parameter 'only_new': must be true or false, got 1")
        }
        expectError(#"{"only_new": true}"#, key: "only_new", reason: "unknown parameter")

        let p = try NolaParameters(json: Data(#"{"stop_patience": 3, "stop_tolerance": 0.02}"#.utf8))
        XCTAssertEqual(p.stopPatience, 3)
        XCTAssertEqual(p.stopTolerance, 0.02)
        XCTAssertEqual(NolaParameters().stopPatience, 0, "the rule is off by default")
        XCTAssertEqual(try NolaParameters(json: p.encodedJSON()), p)
        expectError(#"{"stop_patience": -1}"#, key: "stop_patience", reason: "must be an integer from 0 to 10000, got -1")
        expectError(#"{"stop_tolerance": 0}"#, key: "stop_tolerance", reason: "must be a number greater than 0 and at most 1, got 0")
    }

    func testEncode_thenDecode_roundTrips() throws {
        var p = NolaParameters()
        p.seed = 42; p.kFraction = 0.3; p.promptMicroBatchSize = 12; p.templates = false; p.clipModel = "clip-x"
        let json = p.encodedJSON()
        XCTAssertEqual(try NolaParameters(json: json), p)
        XCTAssertEqual(try NolaParameters(json: NolaParameters().encodedJSON()), NolaParameters())
        let text = String(decoding: json, as: UTF8.self)
        XCTAssertTrue(text.hasPrefix(#"{"abstain_below":0,"abstain_margin_below":0,"abstain_unless_agree":false,"alignment_batch_size":32,"#), text)
        XCTAssertTrue(text.contains(#""prompt_micro_batch_size":12"#), text)
    }

    func testK_followsFindK() {
        let p = NolaParameters()
        XCTAssertEqual(p.k(imageCount: 1000, classCount: 10), 20)   // ⌊0.2 · 100⌋
        XCTAssertEqual(p.k(imageCount: 100, classCount: 10), 16)    // min 16
        XCTAssertEqual(p.k(imageCount: 1299, classCount: 10), 25)   // ⌊25.98⌋
    }
}
