#!/bin/sh
echo entry
