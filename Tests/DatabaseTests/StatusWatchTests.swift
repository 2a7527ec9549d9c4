// `nolad status --watch JOB` as a subprocess with stdout a pipe, against a job a real daemon runs.
import Foundation
import Queue
import XCTest

final class StatusWatchProcessTests: DatabaseTestCase {
    func testStatusWatch_onAPipe_printsFewPlainLines_endingAtTheFinalState() throws {
        let id = try submit(try makeCollection("watched", images: 40))
        _ = try startDaemon("watched", settings: ["image_delay_seconds": "0.05"])
        try waitUntil("job is running", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 1 }
        let (status, output) = try runProgram(try noladExecutable(),
                                              ["status", "--watch", "--interval", "0.1", String(id), "--database", conninfo])
        XCTAssertEqual(status, 0, output)
        let lines = output.split(separator: "\n").map(String.init)
        XCTAssertEqual(try job(id).string("state"), "succeeded")
        XCTAssertTrue(lines.last?.hasPrefix("job \(id) succeeded") == true && lines.last?.hasSuffix(" 100%") == true, output)
        XCTAssertFalse(output.contains("\u{1B}["), "no terminal escapes on a pipe:\n\(output)")
        // about 2 s of polling at 0.1 s is ~20 polls; a line only per tenth of progress or state change
        XCTAssertLessThanOrEqual(lines.count, 12, output)
        XCTAssertGreaterThanOrEqual(lines.count, 2, output)
        XCTAssertTrue(lines.allSatisfy { $0.hasPrefix("job \(id) ") }, output)
    }

    func testStatusWatch_unknownJob_saysSoOnStderr() throws {
        let (status, output) = try runProgram(try noladExecutable(), ["status", "--watch", "999", "--database", conninfo])
        XCTAssertEqual(status, 1)
        XCTAssertTrue(output.contains("no job 999"), output)
    }
}
