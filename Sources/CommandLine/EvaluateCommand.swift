import ArgumentParser
import Daemon
import Foundation
import Method
import Queue

/// `nolad evaluate JOB`: when the collection is one folder per class, how well each per-image signal of
/// nola.labels ranks the job's errors (risk-coverage, docs/labels.md), and what the job's abstention did.
public struct EvaluateCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "evaluate",
        abstract: "Risk-coverage of a job's label signals against folder classes (collection = one sub-folder per class).")

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The job id.")
    public var job: Int64

    @Option(name: .long, help: "Also write every curve point (signal,kept,coverage,accuracy) to this CSV file.")
    public var csv: String?

    public init() {}

    /// The signals compared: a name and the score of one image (higher is trusted more).
    static let signals: [(name: String, score: (Row) -> Double)] = [
        ("confidence", { Double($0.confidence) }),
        ("margin", { Double($0.margin) }),
        // How many of the other two opinions (zero-shot, teacher) name the final class: 0, 1 or 2.
        ("agreement", { Double($0.votes) }),
        // Agreement first, the margin within each level (margin ≤ 1 < 2).
        ("agreement+margin", { 2 * Double($0.votes) + Double($0.margin) }),
    ]

    struct Row {
        let path: String
        let final: String
        let confidence: Float
        let margin: Float
        let votes: Int
        let labelled: Bool
    }

    public func run() throws {
        do {
            let config = try options.load()
            let c = try options.connect(config)
            let job = try c.query("SELECT classes FROM nola.jobs WHERE id = $1", [self.job])
            if job.isEmpty { throw NoladError(.usage, "no job \(self.job)") }
            let classes = try job[0].stringArray("classes")
            let result = try c.query("""
                SELECT path, top_labels[1] AS final, top_probabilities[1] AS confidence, margin,
                       (zero_shot_label IS NOT DISTINCT FROM top_labels[1])::int
                       + (teacher_label IS NOT DISTINCT FROM top_labels[1])::int AS votes,
                       label IS NOT NULL AS labelled
                FROM nola.labels WHERE job_id = $1 AND unreadable IS NULL ORDER BY path
                """, [self.job])
            if result.isEmpty { throw NoladError(.usage, "job \(self.job) has no labels (yet)") }
            var rows: [Row] = []
            for r in result.rows {
                guard let final = try r.optionalString("final"), let margin = try r.optionalString("margin").flatMap(Float.init),
                      let confidence = try r.optionalString("confidence").flatMap(Float.init) else {
                    throw NoladError(.usage, "job \(self.job) has labels without signals (labelled before schema version 7); run it again")
                }
                rows.append(Row(path: try r.string("path"), final: final, confidence: confidence, margin: margin,
                                votes: try r.int("votes"), labelled: try r.bool("labelled")))
            }
            guard let truth = folderLabels(relativePaths: rows.map(\.path), classes: classes) else {
                throw NoladError(.usage, "job \(self.job): the collection is not one sub-folder per class (\(classes.joined(separator: ", "))), so there is nothing to compare the labels with")
            }
            let correct = zip(rows, truth).map { $0.final == classes[$1] }
            print(Self.report(job: self.job, rows: rows, correct: correct, classCount: classes.count), terminator: "")
            if let csv {
                guard FileManager.default.createFile(atPath: csv, contents: Data(Self.curveCSV(rows: rows, correct: correct).utf8)) else {
                    throw NoladError(.usage, "cannot write \(csv)")
                }
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }

    static func report(job: Int64, rows: [Row], correct: [Bool], classCount: Int) -> String {
        func f(_ x: Double) -> String { String(format: "%.4f", x) }
        let n = rows.count
        var out = "job \(job): \(n) labelled images in \(classCount) class folders\n"
        let header = ["signal", "area", "acc@50%", "acc@80%", "accuracy"]
        var table = [header]
        for s in signals {
            let rc = RiskCoverage(scores: rows.map(s.score), correct: correct)
            table.append([s.name, f(rc.area), f(rc.accuracy(coverage: 0.5)), f(rc.accuracy(coverage: 0.8)), f(rc.accuracy)])
        }
        let widths = header.indices.map { i in table.map { $0[i].count }.max()! }
        for line in table {
            out += line.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces) + "\n"
        }
        let kept = rows.indices.filter { rows[$0].labelled }
        let keptAccuracy = kept.isEmpty ? "-" : f(Double(kept.filter { correct[$0] }.count) / Double(kept.count))
        out += "as run: \(kept.count) of \(n) labelled, \(n - kept.count) abstained (coverage \(f(Double(kept.count) / Double(n)))), accuracy of the labelled \(keptAccuracy)\n"
        return out
    }

    /// signal,kept,coverage,accuracy: one row per signal and number of images kept.
    static func curveCSV(rows: [Row], correct: [Bool]) -> String {
        var out = "signal,kept,coverage,accuracy\n"
        for s in signals {
            let rc = RiskCoverage(scores: rows.map(s.score), correct: correct)
            for (k, a) in rc.curve.enumerated() {
                out += "\(s.name),\(k + 1),\(String(format: "%.6f", Double(k + 1) / Double(rows.count))),\(String(format: "%.6f", a))\n"
            }
        }
        return out
    }
}
