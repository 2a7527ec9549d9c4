// WorkerLoopTests — the main loop's decisions (WorkerLoop), the lifecycle's answers to heartbeat
// events and the attempt outcomes, without a database.
@testable import Daemon
import Foundation
@testable import Queue
import XCTest

final class WorkerLoopTests: XCTestCase {
    let t0 = Date(timeIntervalSince1970: 1_000_000)
    func at(_ s: Double) -> Date { t0.addingTimeInterval(s) }

    func makeLoop(concurrency: Int = 1, watchdog: Double? = nil) -> WorkerLoop {
        WorkerLoop(settings: .init(heartbeatSeconds: 10, pollSeconds: 5, watchdogSeconds: watchdog, concurrency: concurrency,
                                   shutdownTimeoutSeconds: 30), now: t0)
    }

    /// Runs `next` until it answers nil, reporting success for each step; returns the steps.
    func turn(_ loop: inout WorkerLoop, at now: Date, running: Int = 0, claimFinds: Bool = false) -> [WorkerLoop.Step] {
        var steps: [WorkerLoop.Step] = []
        while let step = loop.next(now: now, runningJobs: running + steps.filter { $0 == .claim }.count * (claimFinds ? 1 : 0)) {
            steps.append(step)
            _ = loop.succeeded(step, now: now, found: claimFinds)
            if steps.count > 20 { XCTFail("the loop never sleeps"); break }
        }
        return steps
    }

    func testStart_heartbeatThenClaim_thenSleepsUntilThePoll() {
        var loop = makeLoop()
        XCTAssertEqual(turn(&loop, at: t0), [.heartbeat, .claim])
        XCTAssertEqual(loop.sleepTimeout(now: t0), 5, accuracy: 1e-6)
        XCTAssertEqual(turn(&loop, at: at(1)), [], "nothing to do before the poll or a notification")
        XCTAssertEqual(turn(&loop, at: at(5)), [.claim], "the poll claims even without a notification")
        XCTAssertEqual(turn(&loop, at: at(10)), [.heartbeat, .claim])
    }

    func testClaims_fillTheSlots_andStopAtConcurrency() {
        var loop = makeLoop(concurrency: 2)
        XCTAssertEqual(turn(&loop, at: t0, claimFinds: true), [.heartbeat, .claim, .claim])
        loop.notified(channel: "nola_jobs")
        XCTAssertEqual(turn(&loop, at: at(1), running: 2, claimFinds: true), [], "no free slot: no claim")
        loop.jobEnded()
        XCTAssertEqual(turn(&loop, at: at(2), running: 1), [.claim], "a job's end frees a slot")
    }

    func testJobsNotification_claims_cancelNotification_onlyReadsTheFlags() {
        var loop = makeLoop()
        _ = turn(&loop, at: t0)
        loop.notified(channel: "nola_jobs")
        XCTAssertEqual(turn(&loop, at: at(1)), [.claim])
        loop.notified(channel: "nola_cancel")
        XCTAssertEqual(turn(&loop, at: at(2), running: 1), [.checkCancelRequests],
                       "a nola_cancel notification makes the loop read the jobs' cancel_requested flags, nothing else")
        loop.notified(channel: "nola_cancel")
        XCTAssertEqual(turn(&loop, at: at(3)), [], "with no job running there is nothing to look at")
        loop.notified(channel: "something_else")
        XCTAssertEqual(turn(&loop, at: at(3.5)), [])
    }

    func testShutdown_drainsWithoutClaims_thenStopsWhenJobsEnd() {
        var loop = makeLoop()
        _ = turn(&loop, at: t0, claimFinds: true)
        loop.shutdown()
        loop.notified(channel: "nola_jobs")
        XCTAssertEqual(turn(&loop, at: at(1), running: 1), [.beginDrain], "no claim once draining")
        XCTAssertEqual(loop.sleepTimeout(now: at(1)), 0.1, accuracy: 1e-6)
        XCTAssertEqual(turn(&loop, at: at(10), running: 1), [.heartbeat], "leases stay renewed while jobs stop")
        XCTAssertEqual(turn(&loop, at: at(11), running: 0), [.stop])
        XCTAssertEqual(turn(&loop, at: at(12)), [], "stopped for good")
    }

    func makeHelpingLoop(concurrency: Int = 1) -> WorkerLoop {
        WorkerLoop(settings: .init(heartbeatSeconds: 10, pollSeconds: 5, watchdogSeconds: nil, concurrency: concurrency,
                                   shutdownTimeoutSeconds: 30, helpOtherJobs: true), now: t0)
    }

    /// Drives the loop with separate outcomes for job claims and help claims.
    func helpTurn(_ loop: inout WorkerLoop, at now: Date, running: Int = 0, claimFinds: Bool = false, helpFinds: Bool = false) -> [WorkerLoop.Step] {
        var steps: [WorkerLoop.Step] = []
        var busy = running
        while let step = loop.next(now: now, runningJobs: busy) {
            steps.append(step)
            let found = step == .claim ? claimFinds : step == .help ? helpFinds : true
            if (step == .claim || step == .help) && found { busy += 1 }
            _ = loop.succeeded(step, now: now, found: found)
            if steps.count > 20 { XCTFail("the loop never sleeps"); break }
        }
        return steps
    }

    func testFreeSlot_triesAJobFirst_thenHelps_untilTheSlotsAreFull() {
        var loop = makeHelpingLoop(concurrency: 2)
        XCTAssertEqual(helpTurn(&loop, at: t0, helpFinds: true), [.heartbeat, .claim, .help, .help],
                       "no job of its own: both slots help")
        XCTAssertEqual(helpTurn(&loop, at: at(1), running: 2, helpFinds: true), [])
        loop.jobEnded()
        XCTAssertEqual(helpTurn(&loop, at: at(2), running: 1, claimFinds: true), [.claim],
                       "a freed slot claims a job of its own before it helps")
    }

    func testHelp_whenNothingToHelp_waitsForTheWorkNotificationOrThePoll() {
        var loop = makeHelpingLoop()
        XCTAssertEqual(helpTurn(&loop, at: t0), [.heartbeat, .claim, .help])
        XCTAssertEqual(helpTurn(&loop, at: at(1)), [], "nothing to help: no busy loop")
        loop.notified(channel: "nola_work")
        XCTAssertEqual(helpTurn(&loop, at: at(2)), [.help], "new units: only the help claim, the job queue did not change")
        XCTAssertEqual(helpTurn(&loop, at: at(5)), [.claim, .help], "the poll looks at both")
    }

    func testHelp_offByConfiguration_orWhileDraining() {
        var off = makeLoop(concurrency: 2)
        off.notified(channel: "nola_work")
        XCTAssertFalse(turn(&off, at: t0).contains(.help), "help_other_jobs false: never helps")
        var loop = makeHelpingLoop()
        _ = helpTurn(&loop, at: t0)
        loop.shutdown()
        loop.notified(channel: "nola_work")
        XCTAssertEqual(helpTurn(&loop, at: at(1), running: 1), [.beginDrain])
        XCTAssertEqual(helpTurn(&loop, at: at(2), running: 1), [], "no help claimed while draining; a running unit holds the stop")
        XCTAssertEqual(helpTurn(&loop, at: at(3), running: 0), [.stop])
    }

    func testShutdown_pastTheDeadline_releasesTheRest() {
        var loop = makeLoop()
        _ = turn(&loop, at: t0, claimFinds: true)
        loop.shutdown()
        XCTAssertEqual(turn(&loop, at: at(1), running: 1), [.beginDrain])
        XCTAssertEqual(turn(&loop, at: at(31), running: 1), [.releaseRemainingAndStop])
    }

    func testWatchdog_pingedEveryInterval_evenWhileTheDatabaseIsDown() {
        var loop = makeLoop(watchdog: 2)
        XCTAssertEqual(turn(&loop, at: t0).first, .pingWatchdog)
        XCTAssertEqual(loop.next(now: at(2), runningJobs: 0), .pingWatchdog)
        XCTAssertEqual(loop.next(now: at(2), runningJobs: 0), nil)
        XCTAssertEqual(loop.databaseFailed(now: at(2), unit: 0), .outageBegan)
        XCTAssertEqual(loop.sleepTimeout(now: at(2)), 0.1, accuracy: 1e-6)
        for _ in 0..<10 { _ = loop.databaseFailed(now: at(2), unit: 0) } // next try 5 s away
        XCTAssertEqual(loop.sleepTimeout(now: at(2)), 2, accuracy: 1e-6, "the watchdog deadline bounds the sleep")
        XCTAssertEqual(loop.next(now: at(4), runningJobs: 0), .pingWatchdog)
    }

    /// While PostgreSQL is down the loop used to retry about 90 times a second. Now each try waits
    /// 0.1 s doubling up to 5 s (jittered), and only the first failure and the recovery are reported.
    func testDatabaseDown_triesBackOffExponentially_withJitterAndACap_andReportOncePerOutage() {
        var loop = makeLoop()
        _ = turn(&loop, at: t0)
        var now = at(10)
        XCTAssertEqual(loop.next(now: now, runningJobs: 0), .heartbeat)
        var reports: [WorkerLoop.Report] = []
        var tries = 0
        var waits: [Double] = []
        while now < at(10 + 600) {
            if let r = loop.databaseFailed(now: now, unit: 0.999) { reports.append(r) } // the heartbeat failed
            tries += 1
            let wait = loop.sleepTimeout(now: now)
            waits.append(wait)
            XCTAssertNil(loop.next(now: now.addingTimeInterval(wait / 2), runningJobs: 0), "no try before the backoff ends")
            now = now.addingTimeInterval(wait)
            XCTAssertEqual(loop.next(now: now, runningJobs: 0), .heartbeat, "the heartbeat is the reconnect try")
        }
        XCTAssertEqual(reports, [.outageBegan], "one report per outage, not one per try")
        XCTAssertEqual(waits.first!, 0.1 * (1 - 0.5 * 0.999), accuracy: 1e-6)
        XCTAssertEqual(waits[1], 0.2 * (1 - 0.5 * 0.999), accuracy: 1e-6)
        XCTAssertLessThanOrEqual(waits.max()!, 5)
        XCTAssertLessThan(Double(tries), 600 / 2.5 + 10, "at most about one try per 2.5 s once capped, even with the largest jitter")
        XCTAssertEqual(loop.succeeded(.heartbeat, now: now, found: true), .recovered(tries: tries, seconds: now.timeIntervalSince(at(10))))
        XCTAssertFalse(loop.isDatabaseDown)
        XCTAssertEqual(loop.next(now: now, runningJobs: 0), .claim, "claims resume after the reconnect")
    }

    func testDatabaseDown_noClaimsOrPollsUntilTheNextTry() {
        var loop = makeLoop()
        _ = turn(&loop, at: t0)
        _ = loop.databaseFailed(now: at(1), unit: 0)
        for _ in 0..<8 { _ = loop.databaseFailed(now: at(1), unit: 0) }
        loop.notified(channel: "nola_jobs")
        XCTAssertNil(loop.next(now: at(5.9), runningJobs: 0), "neither the poll nor a claim runs while down")
        XCTAssertEqual(loop.sleepTimeout(now: at(1)), 5, accuracy: 1e-6, "the sleep is the backoff, not the overdue heartbeat")
    }
}

final class HeartbeatLifecycleTests: XCTestCase {
    /// The race behind "lease lost" right after a success: the heartbeat renews a lease while the job's
    /// thread writes `succeeded`; the renewal finds no running row. The lifecycle knows the stages
    /// returned and answers nothing, and the worker logs lease loss only for `.interrupt(.leaseLost)`.
    func testRenewalFindsJobGone_afterTheStagesReturned_isNotALeaseLoss() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertTrue(life.wantsLeaseRenewal)
        XCTAssertEqual(life.executionFinished(.succeeded), .markSucceeded)
        XCTAssertFalse(life.wantsLeaseRenewal, "no renewal once the final write is under way")
        XCTAssertEqual(life.renewal(.lost), .none)
    }

    func testRenewalFindsJobGone_whileRunning_interruptsAsLeaseLost_andWritesNothing() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.renewal(.renewed(cancelRequested: false)), .none)
        XCTAssertEqual(life.renewal(.lost), .interrupt(.leaseLost))
        XCTAssertEqual(life.executionFinished(.succeeded), .abandon)
    }

    func testRenewalReportsCancel_interruptsAsCancelled() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.renewal(.renewed(cancelRequested: true)), .interrupt(.cancelled))
        XCTAssertEqual(life.renewal(.renewed(cancelRequested: true)), .none)
    }

    func testElapsed_pastTheTimeout_interruptsOnce() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.elapsed(4, timeout: 5), .none)
        XCTAssertEqual(life.elapsed(6, timeout: 5), .interrupt(.timedOut(seconds: 5)))
        XCTAssertEqual(life.elapsed(7, timeout: 5), .none)
    }

    func testOutcomes_ofEveryWritingAction_areTheSQLValues() {
        XCTAssertEqual(JobLifecycle.Action.markSucceeded.outcome?.rawValue, "succeeded")
        XCTAssertEqual(JobLifecycle.Action.markFailed("timed out by hand").outcome, .failed,
                       "a message that starts with \"timed out\" is not a timeout")
        XCTAssertEqual(JobLifecycle.Action.markFailed("x", kind: .timedOut).outcome?.rawValue, "timed_out")
        XCTAssertEqual(JobLifecycle.Action.scheduleRetry(delay: 1, error: "x").outcome?.rawValue, "retry")
        XCTAssertEqual(JobLifecycle.Action.markCancelled.outcome?.rawValue, "cancelled")
        XCTAssertEqual(JobLifecycle.Action.release.outcome?.rawValue, "released")
        XCTAssertNil(JobLifecycle.Action.abandon.outcome)
        XCTAssertNil(JobLifecycle.Action.interrupt(.cancelled).outcome)
    }
}
