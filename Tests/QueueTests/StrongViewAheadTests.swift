import Foundation
import Imaging
@testable import Pipeline
import XCTest

/// Strong views computed ahead on an idle-priority thread (`StrongViewSource`) are the views the unit
/// would have computed itself, whichever part of a unit the thread got to, and a unit asked for ahead
/// that is not the one computed next costs nothing but the thread's time.
final class StrongViewAheadTests: XCTestCase {
    static let demo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Demo/collection")

    /// 12 of the demo's JPEGs, from two classes.
    func files() throws -> [ImageFile] {
        var out: [ImageFile] = []
        for theme in ["sunset", "ocean"] {
            let folder = Self.demo.appendingPathComponent(theme)
            let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).filter { $0.hasSuffix(".jpg") }.sorted()
            XCTAssertGreaterThanOrEqual(names.count, 6, "the demo collection's \(theme) folder")
            out += names.prefix(6).map { ImageFile(url: folder.appendingPathComponent($0)) }
        }
        return out
    }

    func source(_ files: [ImageFile], threads: Int = 2, idle: Bool = false) -> StrongViewSource {
        StrongViewSource(decoded: DecodedImages(files: files, threads: threads), seed: 42, config: StrongViewConfig(),
                         mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd, idlePriority: idle)
    }

    func testViewsComputedAhead_areTheViewsComputedOnDemand_wholeOrPartly() throws {
        let files = try files()
        let unit = [3, 0, 7, 11, 5, 2], other = [1, 4, 6, 8, 9, 10]
        let plain = source(files)
        let expected = try plain.views(unit, epoch: 2)
        XCTAssertEqual(expected.count, unit.count * plain.slot)
        XCTAssertEqual(plain.viewsAhead, 0)
        // Another epoch gives other views (the seed includes it), so the comparison below means something.
        XCTAssertNotEqual(try plain.views(unit, epoch: 3), expected)

        // All of the unit ahead.
        let whole = source(files)
        defer { whole.close() }
        whole.ahead(unit, epoch: 2)
        XCTAssertTrue(whole.waitForAhead(timeout: 60), "the thread computed the unit's views")
        XCTAssertEqual(try whole.views(unit, epoch: 2), expected)
        XCTAssertEqual(whole.viewsAhead, unit.count)
        XCTAssertEqual(whole.aheadPolicy, SCHED_OTHER)

        // Asked for at once: the thread has done some (maybe none), the caller the rest; same bytes.
        let partly = source(files, threads: 1)
        defer { partly.close() }
        for round in 0..<3 {
            partly.ahead(unit, epoch: 2)
            if round == 1 { usleep(3_000) }
            XCTAssertEqual(try partly.views(unit, epoch: 2), expected, "round \(round)")
        }
        XCTAssertLessThanOrEqual(partly.viewsAhead, 3 * unit.count)
        print("views computed ahead when asked for at once: \(partly.viewsAhead) of \(3 * unit.count)")

        // The unit asked for ahead is not the one computed next (a helper took it): both still right.
        let wrong = source(files)
        defer { wrong.close() }
        wrong.ahead(other, epoch: 2)
        XCTAssertTrue(wrong.waitForAhead(timeout: 60))
        XCTAssertEqual(try wrong.views(unit, epoch: 2), expected)
        XCTAssertEqual(wrong.viewsAhead, 0)
        XCTAssertEqual(try wrong.views(other, epoch: 2), try plain.views(other, epoch: 2))
        // Same images in another epoch are other views: not taken from the thread either.
        wrong.ahead(unit, epoch: 3)
        XCTAssertTrue(wrong.waitForAhead(timeout: 60))
        XCTAssertEqual(try wrong.views(unit, epoch: 2), expected)
    }

    /// The job's thread lowers itself to SCHED_IDLE, so it never takes a core from the kernels.
    func testAheadThread_runsAtIdlePriority() throws {
        let files = try files()
        let idle = source(files, idle: true)
        defer { idle.close() }
        idle.ahead([0, 1], epoch: 0)
        let deadline = Date().addingTimeInterval(30)
        while idle.aheadPolicy == nil && Date() < deadline { usleep(1_000) }
        XCTAssertEqual(idle.aheadPolicy, schedIdle, "SCHED_IDLE")
        // Whether or not the thread got a core meanwhile, the views are right.
        XCTAssertEqual(try idle.views([0, 1], epoch: 0), try source(files).views([0, 1], epoch: 0))
    }

    /// An image that cannot be read when its view is computed ahead fails the unit's call with the
    /// job's message (computed again by the caller, whose error it then is).
    func testAnImageGoneBeforeItsViewIsComputedAhead_failsTheUnitWithItsMessage() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-ahead-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        var files: [ImageFile] = []
        for (i, f) in try self.files().prefix(3).enumerated() {
            let copy = folder.appendingPathComponent("\(i).jpg")
            try FileManager.default.copyItem(atPath: String(decoding: f.pathBytes, as: UTF8.self), toPath: copy.path)
            files.append(ImageFile(url: copy))
        }
        let views = source(files)
        defer { views.close() }
        try FileManager.default.removeItem(at: folder.appendingPathComponent("1.jpg"))
        views.ahead([0, 1, 2], epoch: 0)
        XCTAssertTrue(views.waitForAhead(timeout: 60))
        XCTAssertThrowsError(try views.views([0, 1, 2], epoch: 0)) { error in
            XCTAssertTrue("\(error)".contains("an image became unreadable during prompt tuning"), "\(error)")
            XCTAssertTrue("\(error)".contains("1.jpg"), "\(error)")
        }
        XCTAssertEqual(views.viewsAhead, 2)
    }
}
