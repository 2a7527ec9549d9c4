import Foundation
import XCTest
@testable import Method

final class DescriptionClientTests: XCTestCase {
    static func completion(_ contents: [String]) -> String {
        let choices = contents.enumerated().map { i, c in
            ["index": i, "message": ["role": "assistant", "content": c], "finish_reason": "stop"] as [String: Any]
        }
        let object: [String: Any] = ["id": "x", "object": "chat.completion", "choices": choices]
        return String(decoding: try! JSONSerialization.data(withJSONObject: object), as: UTF8.self)
    }

    func testDescribe_asksEveryQuestion_andParsesReplies() throws {
        let server = try TinyHTTPServer { _, body in
            let object = try! JSONSerialization.jsonObject(with: body) as! [String: Any]
            let messages = object["messages"] as! [[String: String]]
            let question = messages.last!["content"]!
            return (200, Self.completion(["A reply to: \(question) Second sentence here.", "Another answer choice."]))
        }
        defer { server.stop() }
        let endpoint = LLMEndpoint(url: server.url, model: "tiny-llm", apiKey: "sk-secret", timeout: 5, answersPerQuestion: 2)
        let sentences = try DescriptionClient(endpoint: endpoint).describe(className: "golden_retriever")

        let requests = server.requests
        XCTAssertEqual(requests.count, DescriptionClient.questions.count)
        for (request, question) in zip(requests, DescriptionClient.questions) {
            XCTAssertTrue(request.head.hasPrefix("POST /v1/chat/completions HTTP/1.1"), request.head)
            XCTAssertTrue(request.head.contains("Authorization: Bearer sk-secret"), request.head)
            XCTAssertTrue(request.head.lowercased().contains("content-type: application/json"), request.head)
            let body = try JSONSerialization.jsonObject(with: request.body) as! [String: Any]
            XCTAssertEqual(body["model"] as? String, "tiny-llm")
            XCTAssertEqual(body["n"] as? Int, 2)
            let messages = body["messages"] as! [[String: String]]
            XCTAssertEqual(messages.map { $0["role"]! }, ["system", "user"])
            XCTAssertEqual(messages[1]["content"], question.replacingOccurrences(of: "{}", with: "golden retriever"))
        }
        // One distinct first sentence per question, then the two sentences every reply shares, kept once.
        XCTAssertEqual(sentences.count, DescriptionClient.questions.count + 2)
        XCTAssertEqual(sentences[0], "A reply to: Describe what a golden retriever looks like.")
        XCTAssertEqual(sentences[1], "Second sentence here.")
        XCTAssertEqual(sentences[2], "Another answer choice.")
    }

    func testDescribe_whenHTTPError_throwsRequestFailedWithoutSecret() throws {
        let server = try TinyHTTPServer { _, _ in (500, #"{"error": "overloaded"}"#) }
        defer { server.stop() }
        let endpoint = LLMEndpoint(url: server.url, model: "m", apiKey: "sk-secret", timeout: 5)
        do {
            _ = try DescriptionClient(endpoint: endpoint).describe(className: "cat")
            XCTFail("expected an error")
        } catch let error as MethodError {
            XCTAssertEqual(error.code, .llmRequestFailed)
            XCTAssertTrue(error.description.contains("HTTP 500"), error.description)
            XCTAssertFalse(error.description.contains("sk-secret"))
        }
    }

    func testDescribe_whenReplyIsNotACompletion_throwsBadReply() throws {
        let server = try TinyHTTPServer { _, _ in (200, #"{"choices": [{"text": "legacy"}]}"#) }
        defer { server.stop() }
        do {
            _ = try DescriptionClient(endpoint: LLMEndpoint(url: server.url, model: "m", timeout: 5)).describe(className: "cat")
            XCTFail("expected an error")
        } catch let error as MethodError {
            XCTAssertEqual(error.code, .llmBadReply)
            XCTAssertEqual(error.reason, "choices[0] has no message.content string")
        }
    }

    func testDescribe_whenServerNeverAnswers_timesOut() throws {
        let server = try TinyHTTPServer { _, _ in nil }
        defer { server.stop() }
        let start = Date()
        do {
            _ = try DescriptionClient(endpoint: LLMEndpoint(url: server.url, model: "m", timeout: 1)).describe(className: "cat")
            XCTFail("expected an error")
        } catch let error as MethodError {
            XCTAssertEqual(error.code, .llmRequestFailed)
            XCTAssertTrue(error.reason.contains("timed out"), error.reason)
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
    }

    func testDescribe_whenNothingListens_throwsRequestFailed() throws {
        let server = try TinyHTTPServer { _, _ in (200, "{}") }
        let url = server.url
        server.stop()
        do {
            _ = try DescriptionClient(endpoint: LLMEndpoint(url: url, model: "m", timeout: 2)).describe(className: "cat")
            XCTFail("expected an error")
        } catch let error as MethodError {
            XCTAssertEqual(error.code, .llmRequestFailed)
        }
    }
}

/// The wait for an LLM answer: interruptible and free of CPU (it used to spin in URLSession's loop).
final class HTTPRequestWaitTests: XCTestCase {
    static func processCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }

    func testDescribe_whenStopIsRequestedWhileTheEndpointNeverAnswers_endsAtOnce() throws {
        let server = try TinyHTTPServer { _, _ in nil }
        defer { server.stop() }
        let start = Date()
        let stop = NSLock()
        nonisolated(unsafe) var stopRequested = false
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.5) { stop.withLock { stopRequested = true } }
        do {
            _ = try DescriptionClient(endpoint: LLMEndpoint(url: server.url, model: "m", timeout: 60))
                .describe(className: "cat", shouldStop: { stop.withLock { stopRequested } })
            XCTFail("expected an error")
        } catch let error as MethodError {
            XCTAssertEqual(error.code, .cancelled, error.description)
        }
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(elapsed, 0.5)
        XCTAssertLessThan(elapsed, 5, "the 60 s request ended soon after the stop (10 stop checks a second)")
        XCTAssertEqual(server.requests.count, 1)
    }

    func testWaitingForAnEndpointThatNeverAnswers_costsAlmostNoCPU() throws {
        let server = try TinyHTTPServer { _, _ in nil }
        defer { server.stop() }
        let cpu = Self.processCPUSeconds()
        let start = Date()
        XCTAssertThrowsError(try HTTPRequest.post(server.url.appendingPathComponent("chat/completions"), headers: [],
                                                  body: Data("{}".utf8), timeout: 4, shouldStop: { false })) { error in
            XCTAssertEqual(error as? HTTPRequest.Failure, .timedOut(seconds: 4))
        }
        let wall = Date().timeIntervalSince(start)
        let used = Self.processCPUSeconds() - cpu
        print("HTTP wait: \(String(format: "%.3f", used)) CPU-s over \(String(format: "%.1f", wall)) s of waiting")
        XCTAssertGreaterThanOrEqual(wall, 3.5)
        // A spinning client uses about one CPU-second per wall second; a sleeping one almost none.
        XCTAssertLessThan(used, 0.1 * wall, "CPU-seconds while waiting")
    }

    func testPost_refusesSchemesOtherThanHTTP() {
        XCTAssertThrowsError(try HTTPRequest.post(URL(string: "ftp://127.0.0.1/x")!, headers: [], body: Data(), timeout: 1, shouldStop: { false })) { error in
            XCTAssertEqual(error as? HTTPRequest.Failure, .failed("only http and https URLs are supported"))
        }
    }
}
