// `nolad status --watch` rendering as pure functions: terminal frames and plain-line updates for given rows.
@testable import NoladCLI
import XCTest

final class StatusWatchTests: XCTestCase {
    let running = WatchRow(id: 7, state: "running", stage: "describe", progress: 0.4375, done: 120, total: 480,
                           rate: 12.5, etaSeconds: 187)

    func testTerminalLine_showsStageBarPercentImagesRateAndEta() {
        let line = StatusWatch.terminalLine(running, barWidth: 16)
        XCTAssertEqual(line, "job 7  running    describe    [#######---------]   43%  120/480  12.5 img/s  ETA 3m07s")
    }

    func testFrame_firstFrameWritesLines_laterFramesMoveUpOverThePreviousOnes() {
        let queued = WatchRow(id: 8, state: "queued")
        let first = StatusWatch.frame([running, queued], previousLines: 0)
        XCTAssertFalse(first.contains("\u{1B}[2A"))
        XCTAssertEqual(first.components(separatedBy: "\n").count, 3) // two lines and the empty tail
        XCTAssertEqual(first.components(separatedBy: "\r\u{1B}[2K").count, 3) // each line cleared before it is written
        let next = StatusWatch.frame([running, queued], previousLines: 2)
        XCTAssertTrue(next.hasPrefix("\u{1B}[2A\r\u{1B}[2Kjob 7"))
    }

    func testFrame_cutsLinesToTheTerminalWidth_soTheyNeverWrap() {
        let failed = WatchRow(id: 9, state: "failed", stage: "discover", error: String(repeating: "x", count: 300))
        let frame = StatusWatch.frame([failed], previousLines: 0, width: 80)
        XCTAssertEqual(frame.dropFirst(5).dropLast().count, 79) // after "\r ESC [2K", before "\n"
    }

    func testPlainUpdate_printsOnlyWhenStateStageOrTenthOfProgressChanges() {
        var printed: [Int64: String] = [:]
        var r = WatchRow(id: 3, state: "running", stage: "discover", progress: 0.01, done: 1, total: 100, rate: 3)
        XCTAssertEqual(StatusWatch.plainUpdate([r], printed: &printed), ["job 3 running discover 1% 1/100 images"])
        r.progress = 0.05; r.done = 5; r.rate = 4
        XCTAssertEqual(StatusWatch.plainUpdate([r], printed: &printed), [])
        r.progress = 0.12
        XCTAssertEqual(StatusWatch.plainUpdate([r], printed: &printed).count, 1)
        r.stage = "embed"
        XCTAssertEqual(StatusWatch.plainUpdate([r], printed: &printed).count, 1)
        r = WatchRow(id: 3, state: "succeeded", stage: "embed", progress: 1, done: 100, total: 100)
        XCTAssertEqual(StatusWatch.plainUpdate([r], printed: &printed), ["job 3 succeeded embed 100%"])
        XCTAssertTrue(r.isFinished)
    }

    func testDuration_formats() {
        XCTAssertEqual(StatusWatch.duration(12.4), "12s")
        XCTAssertEqual(StatusWatch.duration(3725), "1h02m")
    }
}
