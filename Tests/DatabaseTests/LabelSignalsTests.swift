import Foundation
import Method
import Queue
import XCTest

/// Per-image signals in nola.labels, abstention, the review queue and `nolad evaluate` (docs/labels.md),
/// on real jobs with the tiny fixture models and on hand-made label rows.
final class LabelSignalsTests: DatabaseTestCase {
    static let classes = ["red ball", "green leaf", "blue sky"]

    func submitJob(_ collection: String, parameters: String) throws -> Int64 {
        Int64(try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 3) RETURNING id
            """, [collection, Self.classes, parameters])[0].int("id"))
    }

    struct Signals {
        let path: String
        let label: String?
        let abstained: String?
        let confidence: Double
        let top: [String]
        let probabilities: [Double]
        let margin: Double
        let zeroShot: String
        let teacher: String?
        let agreement: Bool
    }

    func signals(_ job: Int64) throws -> [Signals] {
        let rows = try db.query("""
            SELECT path, label, abstained, confidence, to_jsonb(top_labels)::text AS top, to_jsonb(top_probabilities)::text AS p,
                   margin, zero_shot_label, teacher_label, agreement
            FROM nola.labels WHERE job_id = $1 AND unreadable IS NULL ORDER BY path
            """, [job])
        return try rows.rows.map { r in
            Signals(path: try r.string("path"), label: try r.optionalString("label"), abstained: try r.optionalString("abstained"),
                    confidence: try r.double("confidence"),
                    top: try JSONDecoder().decode([String].self, from: Data(try r.string("top").utf8)),
                    probabilities: try JSONDecoder().decode([Double].self, from: Data(try r.string("p").utf8)),
                    margin: try r.double("margin"), zeroShot: try r.string("zero_shot_label"),
                    teacher: try r.optionalString("teacher_label"), agreement: try r.bool("agreement"))
        }
    }

    func testLabellingJob_writesSignals_abstainsWithReasons_andTheReviewQueueListsMostDoubtfulFirst() throws {
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        _ = try startDaemon("signals", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2",
        ])
        let trained = try submitJob(collection, parameters: #"{"prompt_epochs": 2, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3}"#)
        try waitSucceeded(trained, timeout: 240)

        // Signals: ranges and consistency with the label, the zero-shot label and the teacher's.
        let first = try signals(trained)
        XCTAssertEqual(first.count, 18)
        for s in first {
            XCTAssertNil(s.abstained, s.path)
            XCTAssertEqual(s.top.count, 3, s.path)
            XCTAssertEqual(Set(s.top), Set(Self.classes), s.path)
            XCTAssertEqual(s.top[0], s.label, "top-1 is the label: \(s.path)")
            XCTAssertEqual(s.probabilities[0], s.confidence, accuracy: 1e-6, s.path)
            XCTAssertEqual(s.probabilities, s.probabilities.sorted(by: >), s.path)
            XCTAssertTrue(s.probabilities.allSatisfy { $0 >= 0 && $0 <= 1 }, s.path)
            XCTAssertEqual(s.probabilities.reduce(0, +), 1, accuracy: 1e-4, "all three classes: \(s.path)")
            XCTAssertEqual(s.margin, s.probabilities[0] - s.probabilities[1], accuracy: 1e-6, s.path)
            let teacher = try XCTUnwrap(s.teacher, "a training job has a teacher: \(s.path)")
            XCTAssertTrue(Self.classes.contains(teacher), s.path)
            XCTAssertEqual(s.agreement, s.label == s.zeroShot && s.label == teacher, s.path)
        }
        print("signals test: margins \(first.map { String(format: "%.3f", $0.margin) }.joined(separator: " ")); agreement \(first.filter(\.agreement).count) of 18")
        let metrics = try XCTUnwrap(try events(trained, kind: "metrics").first { $0.stage == "label" }?.metrics)
        XCTAssertEqual(metrics["abstained"] as? Int, 0)
        XCTAssertEqual(metrics["coverage"] as? Double ?? (metrics["coverage"] as? Int).map(Double.init), 1)
        XCTAssertEqual(metrics["agreement_all"] as? Double ?? 0, Double(first.filter(\.agreement).count) / 18, accuracy: 1e-6)

        // Inference only with the three abstention rules; bounds halfway between two of the trained job's
        // confidences (and margins), which the same prompts reproduce, so no image sits on a bound. No teacher there.
        let confidences = first.map(\.confidence).sorted(), margins = first.map(\.margin).sorted()
        XCTAssertLessThan(confidences[8] + 1e-5, confidences[9])
        XCTAssertLessThan(margins[5] + 1e-5, margins[6])
        let confidenceBound = (confidences[8] + confidences[9]) / 2, marginBound = (margins[5] + margins[6]) / 2
        let inference = try submitJob(collection, parameters: """
            {"prompts_from_job": \(trained), "abstain_below": \(confidenceBound), "abstain_margin_below": \(marginBound), "abstain_unless_agree": true}
            """)
        try waitSucceeded(inference, timeout: 120)
        let second = try signals(inference)
        XCTAssertEqual(second.map(\.path), first.map(\.path))
        var expected: [String: Int] = ["confidence": 0, "margin": 0, "disagreement": 0]
        var abstained = 0
        for (s, t) in zip(second, first) {
            XCTAssertNil(s.teacher, "inference only: no teacher")
            XCTAssertEqual(s.top, t.top, s.path)
            XCTAssertEqual(s.confidence, t.confidence, accuracy: 1e-6, s.path)
            XCTAssertEqual(s.agreement, s.top[0] == s.zeroShot, "without a teacher, agreement is final = zero-shot: \(s.path)")
            let low = s.confidence < confidenceBound, narrow = s.margin < marginBound, disagree = !s.agreement
            if low { expected["confidence"]! += 1 }
            if narrow { expected["margin"]! += 1 }
            if disagree { expected["disagreement"]! += 1 }
            if low || narrow || disagree {
                abstained += 1
                XCTAssertNil(s.label, s.path)
                let reason = try XCTUnwrap(s.abstained, s.path)
                XCTAssertEqual(reason.contains("confidence "), low, reason)
                XCTAssertEqual(reason.contains(" below \(confidenceBound)"), low, reason)
                XCTAssertEqual(reason.contains("margin "), narrow, reason)
                XCTAssertEqual(reason.contains("no agreement: final \(s.top[0]), zero-shot \(s.zeroShot)"), disagree, reason)
            } else {
                XCTAssertEqual(s.label, s.top[0], s.path)
                XCTAssertNil(s.abstained, s.path)
            }
        }
        XCTAssertGreaterThan(abstained, 0)
        XCTAssertLessThan(abstained, 18, "the median bounds keep some images")
        let second_metrics = try XCTUnwrap(try events(inference, kind: "metrics").first { $0.stage == "label" }?.metrics)
        XCTAssertEqual(second_metrics["abstained"] as? Int, abstained)
        XCTAssertEqual(second_metrics["abstained_by_reason"] as? [String: Int], expected)
        XCTAssertEqual((second_metrics["labels_per_class"] as? [String: Int])?.values.reduce(0, +), 18 - abstained)
        XCTAssertNotNil(second_metrics["accuracy_labelled"])

        // The review queue: abstentions first, then fewest agreeing opinions, then rising margin; ranks 1, 2, ... per job.
        for job in [trained, inference] {
            let queue = try db.query("""
                SELECT q.review_rank, q.path, q.abstained IS NOT NULL AS a, q.margin, q.agreeing,
                       ((coalesce(l.label, l.top_labels[1]) = l.zero_shot_label) IS TRUE)::int
                       + ((coalesce(l.label, l.top_labels[1]) = l.teacher_label) IS TRUE)::int AS expected_agreeing
                FROM nola.review_queue q JOIN nola.labels l USING (job_id, path) WHERE q.job_id = $1 ORDER BY q.review_rank
                """, [job])
            XCTAssertEqual(queue.count, 18)
            XCTAssertEqual(try queue.rows.map { try $0.int("review_rank") }, Array(1...18))
            XCTAssertEqual(try queue.rows.map { try $0.int("agreeing") }, try queue.rows.map { try $0.int("expected_agreeing") })
            let keys = try queue.rows.map { (try $0.bool("a") ? 0 : 1, try $0.int("agreeing"), try $0.double("margin")) }
            for (a, b) in zip(keys, keys.dropFirst()) {
                XCTAssertTrue(a.0 < b.0 || (a.0 == b.0 && (a.1 < b.1 || (a.1 == b.1 && a.2 <= b.2))), "\(a) before \(b)")
            }
            XCTAssertEqual(keys.filter { $0.0 == 0 }.count, job == inference ? abstained : 0)

            // `nolad labels JOB --review --limit 3`: a header, a rule and the first three of the queue.
            let (status, out) = try runProgram(try noladExecutable(), ["labels", String(job), "--review", "--limit", "3", "--database", conninfo])
            XCTAssertEqual(status, 0, out)
            let lines = out.split(separator: "\n")
            XCTAssertEqual(lines.count, 5, out)
            XCTAssertTrue(lines[0].hasPrefix("rank  path"), out)
            for (k, line) in lines.dropFirst(2).enumerated() {
                XCTAssertTrue(line.hasPrefix("\(k + 1)     \(try queue[k].string("path"))"), out)
            }
        }
        let (status, out) = try runProgram(try noladExecutable(), ["labels", String(trained), "--limit", "3", "--database", conninfo])
        XCTAssertEqual(status, 1, out)
        XCTAssertTrue(out.contains("--limit goes with --review"), out)

        // `nolad evaluate`: the accuracy at full coverage is the label stage's accuracy_final, for every signal.
        let csv = root + "/curves.csv"
        let (evalStatus, report) = try runProgram(try noladExecutable(), ["evaluate", String(trained), "--csv", csv, "--database", conninfo])
        XCTAssertEqual(evalStatus, 0, report)
        print("signals test: evaluate\n\(report)")
        let accuracyFinal = try XCTUnwrap(metrics["accuracy_final"] as? Double ?? (metrics["accuracy_final"] as? Int).map(Double.init))
        let accuracy = String(format: "%.4f", accuracyFinal)
        for name in ["confidence", "margin", "agreement", "agreement+margin"] {
            let line = try XCTUnwrap(report.split(separator: "\n").first { $0.hasPrefix(name + " ") }, report)
            XCTAssertTrue(line.hasSuffix(" " + accuracy), "\(line) vs \(accuracy)")
        }
        let points = try String(contentsOfFile: csv, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(points.first, "signal,kept,coverage,accuracy")
        XCTAssertEqual(points.count, 1 + 4 * 18)
        XCTAssertEqual(points.last?.split(separator: ",").last.map(String.init), String(format: "%.6f", accuracyFinal))
    }

    /// `nolad evaluate` on four hand-made label rows in class folders cat/ and dog/ (classes cat, dog, fox):
    ///   cat/a  final cat 0.9 margin 0.8   zero-shot cat teacher cat  right  (agreement votes 2)
    ///   cat/b  final dog 0.8 margin 0.6   zero-shot cat teacher dog  wrong  (1)
    ///   dog/c  final dog 0.8 margin 0.7   zero-shot dog teacher cat  right  (1)
    ///   dog/d  final cat 0.4 margin 0.05  zero-shot fox teacher fox  wrong  (0), abstained
    /// Confidence ties b and c: kept 1..4 → expected correct 1, 1.5, 2, 2; accuracies 1, .75, .6667, .5; area
    /// .7292; at 80 % (3.2 kept) 2 / 3.2 = .625. Agreement ties b and c too (the same figures). Margin and
    /// agreement+margin order a c b d: accuracies 1, 1, .6667, .5; area .7917; 50 % 1; 80 % .625.
    func testEvaluate_handMadeRows_printsTheRiskCoverageFigures() throws {
        let job = Int64(try db.query("INSERT INTO nola.jobs (collection, classes) VALUES ('/x', '{cat,dog,fox}') RETURNING id")[0].int("id"))
        let rows: [(String, String?, String?, Double, [String], [Double], Double, String, String)] = [
            ("cat/a.jpg", "cat", nil, 0.9, ["cat", "dog", "fox"], [0.9, 0.1, 0], 0.8, "cat", "cat"),
            ("cat/b.jpg", "dog", nil, 0.8, ["dog", "cat", "fox"], [0.8, 0.2, 0], 0.6, "cat", "dog"),
            ("dog/c.jpg", "dog", nil, 0.8, ["dog", "cat", "fox"], [0.8, 0.1, 0.1], 0.7, "dog", "cat"),
            ("dog/d.jpg", nil, "confidence 0.40 below 0.5", 0.4, ["cat", "fox", "dog"], [0.4, 0.35, 0.25], 0.05, "fox", "fox"),
        ]
        for (path, label, abstained, confidence, top, p, margin, zeroShot, teacher) in rows {
            try db.query("INSERT INTO nola.images (job_id, path, size_bytes, sha256, format) VALUES ($1, $2, 1, $3, 'jpeg')",
                         [job, path, String(repeating: "0", count: 64)])
            try db.query("""
                INSERT INTO nola.labels (job_id, path, label, abstained, confidence, top_labels, top_probabilities, margin,
                                         zero_shot_label, zero_shot_confidence, teacher_label, agreement)
                VALUES ($1, $2, $3, $4, $5, $6::text[], $7::real[], $8, $9, 0.5, $10, $11)
                """, [job, path, label, abstained, String(confidence), top, "{" + p.map { String($0) }.joined(separator: ",") + "}",
                      String(margin), zeroShot, teacher, top[0] == zeroShot && top[0] == teacher])
        }
        let csv = root + "/hand.csv"
        let (status, out) = try runProgram(try noladExecutable(), ["evaluate", String(job), "--csv", csv, "--database", conninfo])
        XCTAssertEqual(status, 0, out)
        XCTAssertEqual(out, """
            job \(job): 4 labelled images in 3 class folders
            signal            area    acc@50%  acc@80%  accuracy
            confidence        0.7292  0.7500   0.6250   0.5000
            margin            0.7917  1.0000   0.6250   0.5000
            agreement         0.7292  0.7500   0.6250   0.5000
            agreement+margin  0.7917  1.0000   0.6250   0.5000
            as run: 3 of 4 labelled, 1 abstained (coverage 0.7500), accuracy of the labelled 0.6667

            """)
        let points = try String(contentsOfFile: csv, encoding: .utf8).split(separator: "\n").map(String.init)
        XCTAssertEqual(Array(points.prefix(5)), ["signal,kept,coverage,accuracy", "confidence,1,0.250000,1.000000",
                                                 "confidence,2,0.500000,0.750000", "confidence,3,0.750000,0.666667",
                                                 "confidence,4,1.000000,0.500000"])
        XCTAssertEqual(points[6], "margin,2,0.500000,1.000000")

        // Not one folder per class: said so, exit status 1.
        try db.query("UPDATE nola.jobs SET classes = '{lion,tiger}' WHERE id = $1", [job])
        let (status2, out2) = try runProgram(try noladExecutable(), ["evaluate", String(job), "--database", conninfo])
        XCTAssertEqual(status2, 1, out2)
        XCTAssertTrue(out2.contains("the collection is not one sub-folder per class (lion, tiger)"), out2)
    }
}
