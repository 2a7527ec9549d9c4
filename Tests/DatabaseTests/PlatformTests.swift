import Daemon
import Foundation
import XCTest

/// The built `nolad` refuses a CPU without x86-64-v3 before doing anything else (Sources/nolad/main.swift).
/// NOLAD_CPU_CHECK_HIDE makes this CPU look as if it lacked the named features.
final class PlatformTests: XCTestCase {
    func testNolad_onACPUWithoutAVX2AndFMA_exitsWithOneSentence_beforeParsingArguments() throws {
        var env = ProcessInfo.processInfo.environment
        env["NOLAD_CPU_CHECK_HIDE"] = "avx2,fma"
        // An unknown subcommand would be ArgumentParser's error: the check must come first.
        let (status, output) = try runProgram(try noladExecutable(), ["no-such-command"], environment: env)
        print("build needs x86-64-v3: \(CPUCheck.buildNeedsX86_64_v3); exit \(status): \(output)")
        if CPUCheck.buildNeedsX86_64_v3 {
            XCTAssertEqual(status, 78, "EX_CONFIG, which the units do not restart on")
            XCTAssertEqual(output, "nolad: this build of nolad needs a CPU with AVX2 and FMA (x86-64-v3); this CPU lacks AVX2 and FMA. "
                           + "Build nolad with NOLAD_CPU=generic for this machine (docs/platforms.md).\n")
        } else {
            // A generic build has no check: ArgumentParser's usage error (exit 64) comes through.
            XCTAssertEqual(status, 64, output)
            XCTAssertTrue(output.contains("no-such-command"), output)
        }
        env["NOLAD_CPU_CHECK_HIDE"] = nil
        let (okStatus, version) = try runProgram(try noladExecutable(), ["--version"], environment: env)
        XCTAssertEqual(okStatus, 0, version)
    }
}
